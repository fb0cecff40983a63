//! `emu`: a software x86-64 CPU, so that a stock Linux guest runs where hardware
//! virtualization is missing (QEMU's TCG plays this role for QEMU).
//!
//! Shape:
//! - [`state`]: the architectural register file of one CPU.
//! - [`exception`]: the faults and traps instructions raise.
//! - [`access`]: the [`access::DataAccess`] trait through which instruction semantics touch
//!   guest memory (segmentation and paging live behind it), and operand helpers shared by
//!   every instruction group.
//! - The CPU core (decoder cache, MMU, run loop, system instructions), the instruction
//!   groups (integer, SSE, x87) and the platform models (local APIC, IOAPIC, PIC, PIT,
//!   kvmclock) are added as modules beside these.
//!
//! One interpreter per vCPU thread; guest RAM is shared memory mapped by the vmm, and
//! LOCK-prefixed read-modify-writes are done with host atomics on it so that SMP guests
//! keep x86 semantics.

pub mod access;
pub mod clock;
pub mod cpu;
pub mod cpuid;
pub mod decode;
pub mod exception;
pub mod exec;
pub mod interrupt;
pub mod ioapic;
pub mod jit;
pub mod lapic;
pub mod mmu;
pub mod msr;
pub mod pic;
pub mod pit;
pub mod portable;
pub mod ram;
pub mod router;
pub mod state;

/// Port and MMIO accesses that neither RAM nor the CPU's own local APIC answers. The vmm
/// implements it over its device buses.
pub trait IoBus: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}
