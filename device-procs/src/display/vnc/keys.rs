//! X keysyms (what RFB KeyEvents carry) to PC scan codes (set 1, "XT", which the vmm
//! turns into whatever set the guest's keyboard uses), for a US keyboard layout. A
//! keysym typed with Shift on that layout (`A`, `!`) says so, so that a client that
//! sends the symbol without a Shift press still gets it typed.

/// A key on the PC keyboard: its set-1 make code, and whether it has the 0xe0 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub code: u8,
    pub extended: bool,
}

/// Set-1 make codes of the left Shift key.
pub const LEFT_SHIFT: Key = Key {
    code: 0x2a,
    extended: false,
};

const fn k(code: u8) -> Key {
    Key {
        code,
        extended: false,
    }
}

const fn e(code: u8) -> Key {
    Key {
        code,
        extended: true,
    }
}

/// The US layout's printable characters: unshifted, then shifted, per key.
const PRINTABLE: &[(u8, u8, u8)] = &[
    (b'1', b'!', 0x02),
    (b'2', b'@', 0x03),
    (b'3', b'#', 0x04),
    (b'4', b'$', 0x05),
    (b'5', b'%', 0x06),
    (b'6', b'^', 0x07),
    (b'7', b'&', 0x08),
    (b'8', b'*', 0x09),
    (b'9', b'(', 0x0a),
    (b'0', b')', 0x0b),
    (b'-', b'_', 0x0c),
    (b'=', b'+', 0x0d),
    (b'q', b'Q', 0x10),
    (b'w', b'W', 0x11),
    (b'e', b'E', 0x12),
    (b'r', b'R', 0x13),
    (b't', b'T', 0x14),
    (b'y', b'Y', 0x15),
    (b'u', b'U', 0x16),
    (b'i', b'I', 0x17),
    (b'o', b'O', 0x18),
    (b'p', b'P', 0x19),
    (b'[', b'{', 0x1a),
    (b']', b'}', 0x1b),
    (b'a', b'A', 0x1e),
    (b's', b'S', 0x1f),
    (b'd', b'D', 0x20),
    (b'f', b'F', 0x21),
    (b'g', b'G', 0x22),
    (b'h', b'H', 0x23),
    (b'j', b'J', 0x24),
    (b'k', b'K', 0x25),
    (b'l', b'L', 0x26),
    (b';', b':', 0x27),
    (b'\'', b'"', 0x28),
    (b'`', b'~', 0x29),
    (b'\\', b'|', 0x2b),
    (b'z', b'Z', 0x2c),
    (b'x', b'X', 0x2d),
    (b'c', b'C', 0x2e),
    (b'v', b'V', 0x2f),
    (b'b', b'B', 0x30),
    (b'n', b'N', 0x31),
    (b'm', b'M', 0x32),
    (b',', b'<', 0x33),
    (b'.', b'>', 0x34),
    (b'/', b'?', 0x35),
    (b' ', b' ', 0x39),
];

/// Function and editing keys (keysyms 0xff00..0xffff).
fn special(keysym: u32) -> Option<Key> {
    Some(match keysym {
        0xff08 => k(0x0e),                                    // BackSpace
        0xff09 | 0xfe20 => k(0x0f),                           // Tab, ISO_Left_Tab
        0xff0d => k(0x1c),                                    // Return
        0xff1b => k(0x01),                                    // Escape
        0xffe1 => k(0x2a),                                    // Shift_L
        0xffe2 => k(0x36),                                    // Shift_R
        0xffe3 => k(0x1d),                                    // Control_L
        0xffe4 => e(0x1d),                                    // Control_R
        0xffe9 | 0xffe7 => k(0x38),                           // Alt_L, Meta_L
        0xffea | 0xfe03 => e(0x38),                           // Alt_R, ISO_Level3_Shift
        0xffeb => e(0x5b),                                    // Super_L
        0xffec => e(0x5c),                                    // Super_R
        0xff67 => e(0x5d),                                    // Menu
        0xffe5 => k(0x3a),                                    // Caps_Lock
        0xff7f => k(0x45),                                    // Num_Lock
        0xff14 => k(0x46),                                    // Scroll_Lock
        0xffbe..=0xffc7 => k(0x3b + (keysym - 0xffbe) as u8), // F1..F10
        0xffc8 => k(0x57),                                    // F11
        0xffc9 => k(0x58),                                    // F12
        0xff50 => e(0x47),                                    // Home
        0xff51 => e(0x4b),                                    // Left
        0xff52 => e(0x48),                                    // Up
        0xff53 => e(0x4d),                                    // Right
        0xff54 => e(0x50),                                    // Down
        0xff55 => e(0x49),                                    // Prior
        0xff56 => e(0x51),                                    // Next
        0xff57 => e(0x4f),                                    // End
        0xff63 => e(0x52),                                    // Insert
        0xffff => e(0x53),                                    // Delete
        0xff61 => e(0x37),                                    // Print
        0xff8d => e(0x1c),                                    // KP_Enter
        0xffaa => k(0x37),                                    // KP_Multiply
        0xffab => k(0x4e),                                    // KP_Add
        0xffad => k(0x4a),                                    // KP_Subtract
        0xffae => k(0x53),                                    // KP_Decimal
        0xffaf => e(0x35),                                    // KP_Divide
        0xffb0 => k(0x52),                                    // KP_0
        0xffb1..=0xffb3 => k(0x4f + (keysym - 0xffb1) as u8), // KP_1..KP_3
        0xffb4..=0xffb6 => k(0x4b + (keysym - 0xffb4) as u8), // KP_4..KP_6
        0xffb7..=0xffb9 => k(0x47 + (keysym - 0xffb7) as u8), // KP_7..KP_9
        _ => return None,
    })
}

/// The key of `keysym`, and whether the US layout types it with Shift.
pub fn key_for(keysym: u32) -> Option<(Key, bool)> {
    if let Some(key) = special(keysym) {
        return Some((key, false));
    }
    let c = u8::try_from(keysym).ok()?;
    PRINTABLE.iter().find_map(|&(plain, shifted, code)| {
        if c == plain {
            Some((k(code), false))
        } else if c == shifted {
            Some((k(code), true))
        } else {
            None
        }
    })
}

/// The set-1 bytes of `key` going down or up.
pub fn scancodes(key: Key, down: bool) -> Vec<u8> {
    let code = if down { key.code } else { key.code | 0x80 };
    if key.extended {
        vec![0xe0, code]
    } else {
        vec![code]
    }
}

/// The key of a QEMU extended key event's keycode: a set-1 code, with 0x80 set for the
/// 0xe0 prefix (RFB's QEMU extension).
pub fn key_for_qemu_keycode(keycode: u32) -> Option<Key> {
    let code = (keycode & 0x7f) as u8;
    (keycode < 0x100 && code != 0).then_some(Key {
        code,
        extended: keycode & 0x80 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_digits_and_symbols() {
        assert_eq!(key_for(u32::from(b'a')), Some((k(0x1e), false)));
        assert_eq!(key_for(u32::from(b'A')), Some((k(0x1e), true)));
        assert_eq!(key_for(u32::from(b'!')), Some((k(0x02), true)));
        assert_eq!(key_for(u32::from(b'|')), Some((k(0x2b), true)));
        assert_eq!(key_for(0xff0d), Some((k(0x1c), false)));
        assert_eq!(key_for(0xffc9), Some((k(0x58), false)));
        assert_eq!(key_for(0xff52), Some((e(0x48), false)));
        assert_eq!(key_for(0x20ac), None, "the euro sign has no US key");
        assert_eq!(scancodes(e(0x48), false), [0xe0, 0xc8]);
        assert_eq!(key_for_qemu_keycode(0x9c), Some(e(0x1c)));
        assert_eq!(key_for_qemu_keycode(0x1000), None);
    }
}
