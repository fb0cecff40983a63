//! Display: screendump, set_password, expire_password, change-vnc-password, add_client,
//! query-vnc and query-spice over QMP, and HMP's screendump, `info vnc`, `change vnc
//! password`, set_password, expire_password, sendkey, mouse_move and mouse_button, with
//! QEMU 7.2's replies and words.
//!
//! One difference on purpose: set_password's `connected` is honoured for VNC
//! (`disconnect` drops the clients, `fail` refuses while any is connected), where QEMU
//! 7.2 accepts only `keep` there.

use ipc::display::ImageFormat;
use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::{ErrorClass, QmpError};
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::device_manager::DeviceError;
use crate::machine::Machine;

pub const COMMANDS: &[Command] = &[
    Command::machine("screendump", screendump).with_spec(|| {
        CommandSpec::new(
            "screendump",
            vec![
                ParamSpec::required("filename", ArgType::String),
                ParamSpec::optional("device", ArgType::String),
                ParamSpec::optional("head", ArgType::Integer),
                ParamSpec::optional("format", enumeration(&["ppm", "png"])),
            ],
        )
    }),
    Command::machine("set_password", set_password).with_spec(|| {
        CommandSpec::new(
            "set_password",
            vec![
                ParamSpec::required("protocol", enumeration(&["spice", "vnc"])),
                ParamSpec::required("password", ArgType::String),
                ParamSpec::optional("connected", enumeration(&["keep", "disconnect", "fail"])),
                ParamSpec::optional("display", ArgType::String),
            ],
        )
    }),
    Command::machine("expire_password", expire_password).with_spec(|| {
        CommandSpec::new(
            "expire_password",
            vec![
                ParamSpec::required("protocol", enumeration(&["spice", "vnc"])),
                ParamSpec::required("time", ArgType::String),
                ParamSpec::optional("display", ArgType::String),
            ],
        )
    }),
    // QEMU 7.2's successor of `change vnc password`.
    Command::machine("change-vnc-password", change_vnc_password).with_spec(|| {
        CommandSpec::new(
            "change-vnc-password",
            vec![ParamSpec::required("password", ArgType::String)],
        )
    }),
    Command::machine("add_client", add_client)
        .with_fd_names(|args| {
            args.get("fdname")
                .and_then(Value::as_str)
                .map(str::to_string)
                .into_iter()
                .collect()
        })
        .with_spec(|| {
            CommandSpec::new(
                "add_client",
                vec![
                    ParamSpec::required("protocol", ArgType::String),
                    ParamSpec::required("fdname", ArgType::String),
                    ParamSpec::optional("skipauth", ArgType::Boolean),
                    ParamSpec::optional("tls", ArgType::Boolean),
                ],
            )
        }),
    Command::machine("query-vnc", |ctx| Ok(ctx.machine.devices().query_vnc())),
    Command::machine("query-spice", |_| Ok(query_spice())),
];

fn enumeration(values: &[&str]) -> ArgType {
    ArgType::Enum(values.iter().map(|v| v.to_string()).collect())
}

fn spice_not_in_use() -> QmpError {
    QmpError::new(ErrorClass::DeviceNotActive, "SPICE is not in use")
}

/// We have no SPICE: what QEMU says when it is not in use.
fn query_spice() -> Value {
    json!({"enabled": false, "migrated": false, "mouse-mode": "client"})
}

fn error(e: DeviceError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn screendump(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let filename = ctx.str_arg("filename").unwrap_or("").to_string();
    let format = match ctx.str_arg("format") {
        Some("png") => ImageFormat::Png,
        _ => ImageFormat::Ppm,
    };
    ctx.machine
        .devices()
        .screendump(&filename, format)
        .map(|()| json!({}))
        .map_err(error)
}

fn set_password(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    if ctx.str_arg("protocol") == Some("spice") {
        return Err(spice_not_in_use());
    }
    let password = ctx.str_arg("password").unwrap_or("");
    let connected = ctx.str_arg("connected");
    ctx.machine
        .devices()
        .set_vnc_password(password, connected)
        .map(|()| json!({}))
        .map_err(error)
}

fn expire_password(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    if ctx.str_arg("protocol") == Some("spice") {
        return Err(spice_not_in_use());
    }
    let time = ctx.str_arg("time").unwrap_or("");
    ctx.machine
        .devices()
        .expire_vnc_password(time)
        .map(|()| json!({}))
        .map_err(error)
}

fn change_vnc_password(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let password = ctx.str_arg("password").unwrap_or("");
    ctx.machine
        .devices()
        .set_vnc_password(password, None)
        .map(|()| json!({}))
        .map_err(error)
}

fn add_client(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let fdname = ctx.str_arg("fdname").unwrap_or("").to_string();
    let protocol = ctx.str_arg("protocol").unwrap_or("").to_string();
    let skipauth = ctx.bool_arg("skipauth", false);
    // The descriptor first: a missing one is the error even for a bad protocol.
    let fd = match ctx.call.fds.iter().position(|(n, _)| *n == fdname) {
        Some(i) => ctx.call.fds.remove(i).1,
        None => {
            return Err(QmpError::generic(format!(
                "File descriptor named '{fdname}' has not been found"
            )))
        }
    };
    match protocol.as_str() {
        "vnc" => ctx
            .machine
            .devices()
            .add_vnc_client(fd, skipauth)
            .map(|()| json!({}))
            .map_err(error),
        "spice" => Err(spice_not_in_use()),
        other => Err(QmpError::generic(format!("protocol '{other}' is invalid"))),
    }
}

/// `change vnc password PASS` (the seed's `change` with device `vnc`).
pub fn change_vnc(machine: &Machine, target: &str, arg: Option<&str>) -> Result<(), QmpError> {
    match target {
        "password" | "passwd" => {
            let password = arg.ok_or_else(|| QmpError::generic("Parameter 'arg' is missing"))?;
            machine
                .devices()
                .set_vnc_password(password, None)
                .map_err(error)
        }
        _ => Err(QmpError::generic(
            "changing the VNC server's address is not supported",
        )),
    }
}

// ---- HMP ----

/// The hint QEMU prints before a password error on a display without password auth.
const PASSWORD_HINT: &str =
    "If you want use passwords please enable password auth using '-vnc ${dpy},password'.\n";

fn hmp_error(result: Result<(), QmpError>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

fn password_error(machine: &Machine, result: Result<(), DeviceError>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(e) => {
            let hint = if machine.devices().vnc_has_password_auth() {
                ""
            } else {
                PASSWORD_HINT
            };
            format!("{hint}Error: {e}\n")
        }
    }
}

/// `screendump FILE [-f FORMAT] [DEVICE [HEAD]]` (the flag may come first too).
pub fn hmp_screendump(machine: &Machine, args: &[&str]) -> String {
    match screendump_args(args) {
        Ok((file, format)) => hmp_error(machine.devices().screendump(file, format).map_err(error)),
        Err(text) => text,
    }
}

/// `screendump`'s file and format; the error text for bad arguments.
pub(super) fn screendump_args<'a>(args: &[&'a str]) -> Result<(&'a str, ImageFormat), String> {
    let mut format = ImageFormat::Ppm;
    let mut file = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if *word == "-f" {
            format = match words.next().copied() {
                Some("ppm") => ImageFormat::Ppm,
                Some("png") => ImageFormat::Png,
                Some(other) => {
                    return Err(format!(
                        "Error: Parameter 'format' does not accept value '{other}'\n"
                    ))
                }
                None => return Err("screendump: string expected\n".to_string()),
            };
        } else if file.is_none() {
            file = Some(*word);
        }
    }
    match file {
        Some(file) => Ok((file, format)),
        None => Err("screendump: filename expected\n".to_string()),
    }
}

/// `info vnc`.
pub fn hmp_info_vnc(machine: &Machine) -> String {
    let info = machine.devices().query_vnc();
    if info["enabled"] != true {
        return "None\n".to_string();
    }
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut text = format!(
        "default:\n  Server: {}:{} ({})\n    Auth: {} (Sub: none)\n",
        s(&info, "host"),
        s(&info, "service"),
        s(&info, "family"),
        s(&info, "auth"),
    );
    for c in info["clients"].as_array().into_iter().flatten() {
        text += &format!(
            "  Client: {}:{} ({})\n    x509_dname: none\n    sasl_username: none\n",
            s(c, "host"),
            s(c, "service"),
            s(c, "family"),
        );
    }
    text
}

/// `change vnc password PASS`.
pub fn hmp_change_vnc(machine: &Machine, args: &[&str]) -> String {
    match args {
        ["password" | "passwd", password] => {
            password_error(machine, machine.devices().set_vnc_password(password, None))
        }
        _ => hmp_error(change_vnc(
            machine,
            args.first().copied().unwrap_or(""),
            None,
        )),
    }
}

/// `set_password PROTOCOL PASSWORD [ACTION]`.
pub fn hmp_set_password(machine: &Machine, args: &[&str]) -> String {
    match args {
        ["spice", ..] => "Error: SPICE is not in use\n".to_string(),
        ["vnc", password, rest @ ..] => password_error(
            machine,
            machine
                .devices()
                .set_vnc_password(password, rest.first().copied()),
        ),
        [other, _, ..] => format!("Error: Parameter 'protocol' does not accept value '{other}'\n"),
        _ => "set_password: string expected\n".to_string(),
    }
}

/// `expire_password PROTOCOL TIME`.
pub fn hmp_expire_password(machine: &Machine, args: &[&str]) -> String {
    match args {
        ["spice", ..] => "Error: SPICE is not in use\n".to_string(),
        ["vnc", time, ..] => hmp_error(machine.devices().expire_vnc_password(time).map_err(error)),
        [other, _, ..] => format!("Error: Parameter 'protocol' does not accept value '{other}'\n"),
        _ => "expire_password: string expected\n".to_string(),
    }
}

/// `sendkey KEYS [HOLD_MS]`: keys joined by `-`, pressed in order, released in reverse.
pub fn hmp_sendkey(machine: &Machine, args: &[&str]) -> String {
    match sendkey_scancodes(args) {
        Ok((press, release)) => {
            machine.devices().keyboard_event(&press);
            machine.devices().keyboard_event(&release);
            String::new()
        }
        Err(text) => text,
    }
}

/// The set-1 scancodes `sendkey` sends: the presses, then the releases; the error text
/// for a missing or unknown key.
pub(super) fn sendkey_scancodes(args: &[&str]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let Some(keys) = args.first() else {
        return Err("sendkey: string expected\n".to_string());
    };
    let mut codes = Vec::new();
    for name in keys.split('-') {
        match key_by_name(name) {
            Some(code) => codes.push(code),
            None => return Err(format!("invalid parameter: {name}\n")),
        }
    }
    let mut press = Vec::new();
    for &(code, extended) in &codes {
        if extended {
            press.push(0xe0);
        }
        press.push(code);
    }
    let mut release = Vec::new();
    for &(code, extended) in codes.iter().rev() {
        if extended {
            release.push(0xe0);
        }
        release.push(code | 0x80);
    }
    Ok((press, release))
}

/// `mouse_move DX DY [DZ]`.
pub fn hmp_mouse_move(machine: &Machine, args: &[&str]) -> String {
    match mouse_move_args(args) {
        Ok((dx, dy, dz)) => {
            machine.devices().mouse_event(dx, dy, dz, None);
            String::new()
        }
        Err(text) => text,
    }
}

/// `mouse_move`'s motion (DZ 0 when left out); the error text for bad numbers.
pub(super) fn mouse_move_args(args: &[&str]) -> Result<(i32, i32, i32), String> {
    let number = |i: usize| args.get(i).and_then(|t| t.parse::<i32>().ok());
    match (number(0), number(1)) {
        (Some(dx), Some(dy)) => Ok((dx, dy, number(2).unwrap_or(0))),
        _ => Err("mouse_move: integer expected\n".to_string()),
    }
}

/// `mouse_button STATE` (bit 0 left, 1 middle, 2 right, as QEMU's HMP takes them).
pub fn hmp_mouse_button(machine: &Machine, args: &[&str]) -> String {
    match mouse_button_state(args) {
        Ok(ps2) => {
            machine.devices().mouse_event(0, 0, 0, Some(ps2));
            String::new()
        }
        Err(text) => text,
    }
}

/// `mouse_button`'s state in PS/2's bit order (0 left, 1 right, 2 middle); the error text
/// for a bad number.
pub(super) fn mouse_button_state(args: &[&str]) -> Result<u8, String> {
    match args.first().and_then(|t| t.parse::<u8>().ok()) {
        Some(state) => Ok((state & 1) | ((state & 4) >> 1) | ((state & 2) << 1)),
        None => Err("mouse_button: integer expected\n".to_string()),
    }
}

/// QEMU's key names (its `QKeyCode`s) for a US keyboard: the set-1 code and whether it
/// has the 0xe0 prefix.
fn key_by_name(name: &str) -> Option<(u8, bool)> {
    const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
    const LETTER_CODES: [u8; 26] = [
        0x1e, 0x30, 0x2e, 0x20, 0x12, 0x21, 0x22, 0x23, 0x17, 0x24, 0x25, 0x26, 0x32, 0x31, 0x18,
        0x19, 0x10, 0x13, 0x1f, 0x14, 0x16, 0x2f, 0x11, 0x2d, 0x15, 0x2c,
    ];
    if let [c] = name.as_bytes() {
        if let Some(i) = LETTERS.iter().position(|l| l == c) {
            return Some((LETTER_CODES[i], false));
        }
        if c.is_ascii_digit() {
            let n = c - b'0';
            return Some((if n == 0 { 0x0b } else { 0x01 + n }, false));
        }
    }
    if let Some(n) = name.strip_prefix('f').and_then(|n| n.parse::<u8>().ok()) {
        return match n {
            1..=10 => Some((0x3a + n, false)),
            11 => Some((0x57, false)),
            12 => Some((0x58, false)),
            _ => None,
        };
    }
    Some(match name {
        "esc" => (0x01, false),
        "minus" => (0x0c, false),
        "equal" => (0x0d, false),
        "backspace" => (0x0e, false),
        "tab" => (0x0f, false),
        "bracket_left" => (0x1a, false),
        "bracket_right" => (0x1b, false),
        "ret" => (0x1c, false),
        "ctrl" => (0x1d, false),
        "ctrl_r" => (0x1d, true),
        "semicolon" => (0x27, false),
        "apostrophe" => (0x28, false),
        "grave_accent" => (0x29, false),
        "shift" => (0x2a, false),
        "backslash" => (0x2b, false),
        "comma" => (0x33, false),
        "dot" => (0x34, false),
        "slash" => (0x35, false),
        "shift_r" => (0x36, false),
        "asterisk" => (0x37, false),
        "alt" => (0x38, false),
        "alt_r" => (0x38, true),
        "spc" => (0x39, false),
        "caps_lock" => (0x3a, false),
        "num_lock" => (0x45, false),
        "scroll_lock" => (0x46, false),
        "home" => (0x47, true),
        "up" => (0x48, true),
        "pgup" => (0x49, true),
        "left" => (0x4b, true),
        "right" => (0x4d, true),
        "end" => (0x4f, true),
        "down" => (0x50, true),
        "pgdn" => (0x51, true),
        "insert" => (0x52, true),
        "delete" => (0x53, true),
        "meta_l" => (0x5b, true),
        "meta_r" => (0x5c, true),
        "menu" => (0x5d, true),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names() {
        assert_eq!(key_by_name("a"), Some((0x1e, false)));
        assert_eq!(key_by_name("1"), Some((0x02, false)));
        assert_eq!(key_by_name("0"), Some((0x0b, false)));
        assert_eq!(key_by_name("f1"), Some((0x3b, false)));
        assert_eq!(key_by_name("f12"), Some((0x58, false)));
        assert_eq!(key_by_name("up"), Some((0x48, true)));
        assert_eq!(key_by_name("frob"), None);
        assert_eq!(key_by_name("f13"), None);
    }

    #[test]
    fn no_spice() {
        assert_eq!(query_spice()["enabled"], false);
    }
}
