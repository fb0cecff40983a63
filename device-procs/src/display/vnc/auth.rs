//! VNC Authentication (RFC 6143 7.2.2): the client encrypts a 16-byte challenge with DES,
//! keyed by the first 8 bytes of the password (zero-padded), each byte's bits reversed.

use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};
use des::Des;

pub const CHALLENGE_LEN: usize = 16;

/// What a client holding `password` answers to `challenge`.
pub fn response(password: &str, challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    let des = Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_mut(8) {
        des.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// A fresh random challenge.
pub fn challenge() -> std::io::Result<[u8; CHALLENGE_LEN]> {
    let mut c = [0u8; CHALLENGE_LEN];
    // SAFETY: getrandom writes at most the length we pass into our buffer.
    let n = unsafe { libc::getrandom(c.as_mut_ptr().cast(), c.len(), 0) };
    if n != c.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(c)
}

/// Constant-time comparison of a client's answer with the expected one.
pub fn matches(a: &[u8; CHALLENGE_LEN], b: &[u8; CHALLENGE_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_answer() {
        // (Interop with real clients is checked end to end, with vncdotool.)
        let challenge: [u8; 16] = std::array::from_fn(|i| i as u8);
        let a = response("password", &challenge);
        // Only the first 8 characters count.
        assert_eq!(a, response("password-and-more", &challenge));
        assert_ne!(a, response("passwore", &challenge));
        assert!(matches(&a, &a));
        assert!(!matches(&a, &challenge));
        let c1 = challenge_or_zero();
        assert_ne!(c1, challenge_or_zero(), "challenges differ");
    }

    fn challenge_or_zero() -> [u8; 16] {
        challenge().unwrap_or([0; 16])
    }
}
