//! Tiny hand-made guests: 64-bit code assembled with iced-x86 and wrapped in an ELF64 image
//! that the vmm loads with `-kernel` and enters in long mode (identity-mapped 4 GiB).

use iced_x86::code_asm::*;

/// Where test guests are loaded and entered.
pub const LOAD_ADDR: u64 = 0x20_0000;
/// The UART data port (COM1).
pub const COM1: u16 = 0x3f8;
/// The isa-debug-exit port the tests configure.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Wrap `code` (linked at `addr`) in an ELF64 image with one PT_LOAD segment.
pub fn elf64(addr: u64, code: &[u8]) -> Vec<u8> {
    vmm::loader::elf64_image(addr, code, 0)
}

/// A 64-bit assembler with helpers for the things test guests do.
pub struct Asm {
    pub a: CodeAssembler,
}

impl Default for Asm {
    fn default() -> Self {
        Self::new()
    }
}

impl Asm {
    pub fn new() -> Self {
        Self {
            a: CodeAssembler::new(64).expect("64-bit assembler"),
        }
    }

    /// Write `text` to COM1, one byte at a time.
    pub fn print(&mut self, text: &str) {
        self.a.mov(dx, COM1 as u32).unwrap();
        for b in text.bytes() {
            self.a.mov(al, b as u32).unwrap();
            self.a.out(dx, al).unwrap();
        }
    }

    /// Print EAX as 8 hex digits to COM1 (clobbers eax, ebx, ecx, edx).
    pub fn print_eax_hex(&mut self) {
        let a = &mut self.a;
        a.mov(ebx, eax).unwrap();
        a.mov(ecx, 8u32).unwrap();
        a.mov(dx, COM1 as u32).unwrap();
        let mut top = a.create_label();
        let mut digit = a.create_label();
        a.set_label(&mut top).unwrap();
        a.rol(ebx, 4u32).unwrap();
        a.mov(eax, ebx).unwrap();
        a.and(eax, 0xfu32).unwrap();
        a.add(eax, b'0' as u32).unwrap();
        a.cmp(eax, b'9' as u32).unwrap();
        a.jbe(digit).unwrap();
        a.add(eax, (b'a' - b'9' - 1) as u32).unwrap();
        a.set_label(&mut digit).unwrap();
        a.out(dx, al).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
    }

    /// Write `value` to the debug-exit port: the vmm exits with `(value << 1) | 1`.
    pub fn debug_exit(&mut self, value: u32) {
        self.a.mov(dx, DEBUG_EXIT_PORT as u32).unwrap();
        self.a.mov(eax, value).unwrap();
        self.a.out(dx, eax).unwrap();
    }

    /// Halt forever (with interrupts off).
    pub fn hang(&mut self) {
        let mut l = self.a.create_label();
        self.a.cli().unwrap();
        self.a.set_label(&mut l).unwrap();
        self.a.hlt().unwrap();
        self.a.jmp(l).unwrap();
    }

    /// Assemble at [`LOAD_ADDR`] and wrap in an ELF image.
    pub fn elf(mut self) -> Vec<u8> {
        let code = self.a.assemble(LOAD_ADDR).expect("assemble test guest");
        elf64(LOAD_ADDR, &code)
    }

    /// Assemble at [`LOAD_ADDR`] and return the raw code.
    pub fn code(mut self) -> Vec<u8> {
        self.a.assemble(LOAD_ADDR).expect("assemble test guest")
    }
}

/// Write `dir/guest.elf`: a guest that prints `text` to COM1 and then halts forever.
/// Returns its path, for `-kernel`.
pub fn hanging_guest(dir: &crate::TempDir, text: &str) -> String {
    let mut g = Asm::new();
    g.print(text);
    g.hang();
    let path = dir.join("guest.elf");
    std::fs::write(&path, g.elf()).expect("write the guest image");
    path.to_str().expect("a UTF-8 temporary path").to_string()
}
