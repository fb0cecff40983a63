//! x86-64 machine specifics: memory map, boot protocol, ACPI tables.

pub mod acpi;
pub mod boot;
pub mod layout;
