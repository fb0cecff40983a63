/*
 * SMP stress for the emu CPU, run inside the guest (tests/tests/emu_smp.rs builds it with the
 * host's gcc, static). THREADS threads, each pinned to its own CPU, make ITERATIONS increments
 * of three shared counters: with LOCK XADD, with a CMPXCHG loop, and as a plain increment under
 * an XCHG spinlock. A fourth check is x86's message-passing order (TSO): thread 0 stores data
 * then a flag; thread 1 reads the flag then the data and must never see the data older than the
 * flag. Prints the totals and SMP-OK when every one is exact.
 *
 * Usage: smp_stress THREADS ITERATIONS
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_THREADS 8

static long atomic_total, cas_total;
static volatile long locked_total;
static int spin;
static volatile long mp_data, mp_flag;
static long mp_violations;
static long iterations;
static int threads;
static int cpu_of[MAX_THREADS];
static pthread_barrier_t start;

static void lock(void)
{
	while (__atomic_exchange_n(&spin, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(&spin, __ATOMIC_RELAXED))
			__builtin_ia32_pause();
}

static void unlock(void)
{
	__atomic_store_n(&spin, 0, __ATOMIC_RELEASE);
}

static void *worker(void *arg)
{
	long id = (long)arg;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(id, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		perror("sched_setaffinity");
	pthread_barrier_wait(&start);
	cpu_of[id] = sched_getcpu();
	for (long i = 1; i <= iterations; i++) {
		__atomic_fetch_add(&atomic_total, 1, __ATOMIC_SEQ_CST);
		long old = __atomic_load_n(&cas_total, __ATOMIC_RELAXED);
		while (!__atomic_compare_exchange_n(&cas_total, &old, old + 1, 0,
						    __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
			;
		lock();
		locked_total = locked_total + 1;
		unlock();
		if (id == 0) {
			/* Plain stores in program order; only the compiler is held back. */
			mp_data = i;
			__asm__ volatile("" ::: "memory");
			mp_flag = i;
		} else if (id == 1) {
			long f = mp_flag;
			__asm__ volatile("" ::: "memory");
			long d = mp_data;
			if (d < f)
				mp_violations++;
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t tid[MAX_THREADS];

	if (argc != 3)
		return 2;
	threads = atoi(argv[1]);
	iterations = atol(argv[2]);
	if (threads < 2 || threads > MAX_THREADS || iterations < 1)
		return 2;
	pthread_barrier_init(&start, NULL, threads);
	for (long i = 0; i < threads; i++)
		if (pthread_create(&tid[i], NULL, worker, (void *)i) != 0)
			return 3;
	for (int i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);

	long expected = threads * iterations;
	int distinct = 0;
	for (int i = 0; i < threads; i++) {
		int seen = 0;
		for (int j = 0; j < i; j++)
			seen |= cpu_of[j] == cpu_of[i];
		distinct += !seen;
	}
	printf("cpus=%d atomic=%ld cas=%ld locked=%ld expected=%ld mp-violations=%ld\n",
	       distinct, atomic_total, cas_total, locked_total, expected, mp_violations);
	if (distinct == threads && atomic_total == expected && cas_total == expected &&
	    locked_total == expected && mp_violations == 0)
		printf("SMP-%s\n", "OK");
	return 0;
}
