//! Per-command argument specs, built from the seed's `args_type` strings
//! (`qmp-commands.hx`), and argument checking with QEMU 7.2's error texts.
//!
//! `args_type` is a comma-separated list of `name:type`, `?` after the type
//! marking it optional. Types: `s` string, `F` file name, `B` block device
//! (strings); `i`, `l`, `M`, `o` integers; `T` number; `b` boolean; `-x` a
//! flag (optional boolean); `O` "any further options" (unknown members are
//! allowed); `q` any value.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::protocol::{ErrorClass, QmpError};
use crate::writer::qdict_order;

/// The seed, copied from `shared/spec/qmp-commands.hx`.
pub const SEED: &str = include_str!("../spec/qmp-commands.hx");

/// Type of one argument; the names in error messages are QEMU 7.2's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgType {
    String,
    /// A signed 64-bit integer (QAPI `int`).
    Integer,
    /// An integer or a float.
    Number,
    Boolean,
    Object,
    Array(Box<ArgType>),
    /// A string from a fixed set (a QAPI enum).
    Enum(Vec<String>),
    /// Anything; the command checks it.
    Any,
}

impl ArgType {
    /// The name QEMU 7.2 prints after "expected: ".
    fn expected_name(&self) -> &'static str {
        match self {
            ArgType::String | ArgType::Enum(_) => "string",
            ArgType::Integer => "integer",
            ArgType::Number => "number",
            ArgType::Boolean => "boolean",
            ArgType::Object => "object",
            ArgType::Array(_) => "array",
            ArgType::Any => "any",
        }
    }
}

/// One declared argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub ty: ArgType,
    pub optional: bool,
}

impl ParamSpec {
    pub fn required(name: &str, ty: ArgType) -> Self {
        ParamSpec {
            name: name.to_string(),
            ty,
            optional: false,
        }
    }

    pub fn optional(name: &str, ty: ArgType) -> Self {
        ParamSpec {
            name: name.to_string(),
            ty,
            optional: true,
        }
    }
}

/// The arguments a command takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub name: String,
    /// Checked in this order, as QEMU visits members in schema order.
    pub params: Vec<ParamSpec>,
    /// Members not in `params` are passed through (`O` in args_type).
    pub accepts_extra: bool,
}

impl CommandSpec {
    /// A command without arguments.
    pub fn no_args(name: &str) -> Self {
        CommandSpec {
            name: name.to_string(),
            params: Vec::new(),
            accepts_extra: false,
        }
    }

    pub fn new(name: &str, params: Vec<ParamSpec>) -> Self {
        CommandSpec {
            name: name.to_string(),
            params,
            accepts_extra: false,
        }
    }

    /// Builds a spec from a seed `args_type` string.
    pub fn from_args_type(name: &str, args_type: &str) -> Result<Self, SchemaError> {
        let mut spec = CommandSpec::no_args(name);
        for item in args_type.split(',').filter(|item| !item.is_empty()) {
            let (param, ty) = item
                .split_once(':')
                .ok_or_else(|| SchemaError::BadArgsType {
                    command: name.to_string(),
                    item: item.to_string(),
                })?;
            let (ty, optional) = match ty.strip_suffix('?') {
                Some(ty) => (ty, true),
                None => (ty, false),
            };
            let ty = match ty {
                "s" | "F" | "B" => ArgType::String,
                "i" | "l" | "M" | "o" => ArgType::Integer,
                "T" => ArgType::Number,
                "b" => ArgType::Boolean,
                "O" => {
                    spec.accepts_extra = true;
                    continue;
                }
                "q" => ArgType::Any,
                flag if flag.starts_with('-') => {
                    spec.params
                        .push(ParamSpec::optional(param, ArgType::Boolean));
                    continue;
                }
                _ => {
                    return Err(SchemaError::BadArgsType {
                        command: name.to_string(),
                        item: item.to_string(),
                    })
                }
            };
            spec.params.push(ParamSpec {
                name: param.to_string(),
                ty,
                optional,
            });
        }
        Ok(spec)
    }

    /// Checks arguments as QEMU 7.2's input visitor does: declared members in
    /// order (missing, then type), then the first unexpected member.
    pub fn check(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        for param in &self.params {
            match args.get(&param.name) {
                None if param.optional => {}
                None => return Err(generic(format!("Parameter '{}' is missing", param.name))),
                Some(value) => check_value(&param.name, Some(&param.name), &param.ty, value)?,
            }
        }
        if !self.accepts_extra {
            if let Some(extra) = qdict_order(args)
                .into_iter()
                .find(|key| !self.params.iter().any(|p| &p.name == *key))
            {
                return Err(generic(format!("Parameter '{extra}' is unexpected")));
            }
        }
        Ok(())
    }
}

fn generic(desc: String) -> QmpError {
    QmpError::new(ErrorClass::GenericError, desc)
}

/// `path` names the value in type errors (`enable[0]`); `enum_name` is what
/// enum errors print, which QEMU leaves as "null" for list elements.
fn check_value(
    path: &str,
    enum_name: Option<&str>,
    ty: &ArgType,
    value: &Value,
) -> Result<(), QmpError> {
    let type_ok = match ty {
        ArgType::String | ArgType::Enum(_) => value.is_string(),
        ArgType::Integer => value.as_i64().is_some(),
        ArgType::Number => value.is_number(),
        ArgType::Boolean => value.is_boolean(),
        ArgType::Object => value.is_object(),
        ArgType::Array(_) => value.is_array(),
        ArgType::Any => true,
    };
    if !type_ok {
        return Err(generic(format!(
            "Invalid parameter type for '{path}', expected: {}",
            ty.expected_name()
        )));
    }
    match (ty, value) {
        (ArgType::Enum(allowed), Value::String(text)) if !allowed.iter().any(|a| a == text) => {
            Err(generic(format!(
                "Parameter '{}' does not accept value '{text}'",
                enum_name.unwrap_or("null")
            )))
        }
        (ArgType::Array(element), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check_value(&format!("{path}[{i}]"), None, element, item)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Errors in a seed file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error("command '{command}': cannot parse args_type item '{item}'")]
    BadArgsType { command: String, item: String },
    #[error("command '{0}' has a .name but no .args_type")]
    MissingArgsType(String),
}

/// The commands a monitor accepts, with their argument specs.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    commands: BTreeMap<String, CommandSpec>,
}

impl Schema {
    pub fn empty() -> Self {
        Schema::default()
    }

    /// All seed commands (dispatch-table entries plus the documented
    /// argument-less queries), with QEMU 7.2's argument refinements.
    pub fn seed() -> Result<Self, SchemaError> {
        let mut schema = Schema::parse_hx(SEED)?;
        schema.apply_qemu72_refinements();
        Ok(schema)
    }

    /// Parses a qmp-commands.hx text: every `.name`/`.args_type` entry, and
    /// every documented command (a `name` line underlined with dashes) that
    /// has no entry, as an argument-less command.
    pub fn parse_hx(text: &str) -> Result<Self, SchemaError> {
        let mut schema = Schema::empty();
        let mut pending_name: Option<String> = None;
        let mut previous_line = "";
        let mut documented = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if let Some(name) = field_value(trimmed, ".name") {
                if let Some(name) = pending_name.take() {
                    return Err(SchemaError::MissingArgsType(name));
                }
                pending_name = Some(name.to_string());
            } else if let Some(args_type) = field_value(trimmed, ".args_type") {
                if let Some(name) = pending_name.take() {
                    schema.insert(CommandSpec::from_args_type(&name, args_type)?);
                }
            } else if !line.is_empty()
                && line.chars().all(|c| c == '-')
                && !previous_line.is_empty()
                && previous_line
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '-')
            {
                documented.push(previous_line.to_string());
            }
            previous_line = line;
        }
        if let Some(name) = pending_name {
            return Err(SchemaError::MissingArgsType(name));
        }
        for name in documented {
            if !schema.commands.contains_key(&name) {
                schema.insert(CommandSpec::no_args(&name));
            }
        }
        Ok(schema)
    }

    /// Where QEMU 7.2's QAPI schema is stricter than the seed's args_type,
    /// follow 7.2 (these are the cases a client can observe):
    /// enums for password protocols and `connected`, the `enable` list of
    /// qmp_capabilities, and device_add's required `driver`.
    fn apply_qemu72_refinements(&mut self) {
        let protocols = || ArgType::Enum(vec!["vnc".into(), "spice".into()]);
        if let Some(spec) = self.commands.get_mut("set_password") {
            set_type(spec, "protocol", protocols());
            set_type(
                spec,
                "connected",
                ArgType::Enum(vec!["keep".into(), "disconnect".into(), "fail".into()]),
            );
        }
        if let Some(spec) = self.commands.get_mut("expire_password") {
            set_type(spec, "protocol", protocols());
        }
        if self.commands.contains_key("qmp_capabilities") {
            self.insert(CommandSpec::new(
                "qmp_capabilities",
                vec![ParamSpec::optional(
                    "enable",
                    ArgType::Array(Box::new(ArgType::Enum(vec!["oob".into()]))),
                )],
            ));
        }
        if let Some(spec) = self.commands.get_mut("device_add") {
            if !spec.params.iter().any(|p| p.name == "driver") {
                spec.params
                    .insert(0, ParamSpec::required("driver", ArgType::Any));
            }
        }
    }

    /// Adds or replaces a command (e.g. QEMU 7.2's query-cpus-fast).
    pub fn insert(&mut self, spec: CommandSpec) {
        self.commands.insert(spec.name.clone(), spec);
    }

    /// Removes a command; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        self.commands.remove(name).is_some()
    }

    /// Keeps only the commands for which `keep` is true (the ones the VMM
    /// implements, so that query-commands and CommandNotFound tell the truth).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.commands.retain(|name, _| keep(name));
    }

    pub fn get(&self, name: &str) -> Option<&CommandSpec> {
        self.commands.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Command names in alphabetical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.commands.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

fn set_type(spec: &mut CommandSpec, param: &str, ty: ArgType) {
    if let Some(p) = spec.params.iter_mut().find(|p| p.name == param) {
        p.ty = ty;
    }
}

/// The quoted value of a `.field = "value",` line.
fn field_value<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let rest = line
        .strip_prefix(field)?
        .trim_start()
        .strip_prefix('=')?
        .trim();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(schema: &Schema, command: &str, args: Value) -> Result<(), String> {
        let Value::Object(args) = args else {
            panic!("args must be an object")
        };
        schema
            .get(command)
            .expect("command")
            .check(&args)
            .map_err(|e| e.desc)
    }

    #[test]
    fn seed_has_49_commands() {
        let schema = Schema::seed().unwrap();
        assert_eq!(schema.len(), 49);
        for name in [
            "quit",
            "eject",
            "query-block",
            "query-balloon",
            "human-monitor-command",
            "query-cpus",
        ] {
            assert!(schema.contains(name), "{name}");
        }
        let eject = schema.get("eject").unwrap();
        assert_eq!(
            eject.params,
            vec![
                ParamSpec::optional("force", ArgType::Boolean),
                ParamSpec::required("device", ArgType::String)
            ]
        );
        assert!(schema.get("netdev_add").unwrap().accepts_extra);
        assert!(schema.get("query-pci").unwrap().params.is_empty());
    }

    /// Error texts observed from QEMU 7.2.22 for the same arguments.
    #[test]
    fn errors_match_qemu() {
        let s = Schema::seed().unwrap();
        assert_eq!(
            check(&s, "set_link", json!({"name": "x", "up": "no"})),
            Err("Invalid parameter type for 'up', expected: boolean".into())
        );
        assert_eq!(
            check(&s, "set_link", json!({"name": "x"})),
            Err("Parameter 'up' is missing".into())
        );
        assert_eq!(
            check(&s, "set_link", json!({"up": 1})),
            Err("Parameter 'name' is missing".into())
        );
        assert_eq!(
            check(&s, "set_link", json!({"name": 1})),
            Err("Invalid parameter type for 'name', expected: string".into())
        );
        // Missing members are reported before unexpected ones.
        assert_eq!(
            check(&s, "set_link", json!({"name": "x", "zz": 1})),
            Err("Parameter 'up' is missing".into())
        );
        assert_eq!(
            check(&s, "set_link", json!({"name": "x", "up": true, "zz": 1})),
            Err("Parameter 'zz' is unexpected".into())
        );
        assert_eq!(
            check(&s, "query-status", json!({"x": 1})),
            Err("Parameter 'x' is unexpected".into())
        );
        for bad in [json!("x"), json!(1.5), json!(18446744073709551615u64)] {
            assert_eq!(
                check(
                    &s,
                    "pmemsave",
                    json!({"val": bad, "size": 1, "filename": "/dev/null"})
                ),
                Err("Invalid parameter type for 'val', expected: integer".into())
            );
        }
        assert_eq!(
            check(
                &s,
                "human-monitor-command",
                json!({"command-line": "info version", "cpu-index": "0"})
            ),
            Err("Invalid parameter type for 'cpu-index', expected: integer".into())
        );
        assert_eq!(
            check(&s, "human-monitor-command", json!({})),
            Err("Parameter 'command-line' is missing".into())
        );
        assert_eq!(
            check(&s, "eject", json!({"device": "x", "force": 1})),
            Err("Invalid parameter type for 'force', expected: boolean".into())
        );
        assert_eq!(
            check(&s, "balloon", json!({"value": 1.5})),
            Err("Invalid parameter type for 'value', expected: integer".into())
        );
        assert_eq!(
            check(
                &s,
                "set_password",
                json!({"protocol": "bogus", "password": "x"})
            ),
            Err("Parameter 'protocol' does not accept value 'bogus'".into())
        );
        assert_eq!(
            check(
                &s,
                "set_password",
                json!({"protocol": "vnc", "password": "x", "connected": "bogus"})
            ),
            Err("Parameter 'connected' does not accept value 'bogus'".into())
        );
        assert_eq!(
            check(&s, "qmp_capabilities", json!({"enable": ["foo"]})),
            Err("Parameter 'null' does not accept value 'foo'".into())
        );
        assert_eq!(
            check(&s, "qmp_capabilities", json!({"enable": "oob"})),
            Err("Invalid parameter type for 'enable', expected: array".into())
        );
        assert_eq!(
            check(&s, "qmp_capabilities", json!({"enable": [1]})),
            Err("Invalid parameter type for 'enable[0]', expected: string".into())
        );
        assert_eq!(
            check(&s, "device_add", json!({"id": "x"})),
            Err("Parameter 'driver' is missing".into())
        );
        assert_eq!(
            check(
                &s,
                "device_add",
                json!({"driver": "e1000", "id": "x", "mac": "52:54:00:12:34:56"})
            ),
            Ok(())
        );
        assert_eq!(
            check(&s, "migrate_set_downtime", json!({"value": 0.1})),
            Ok(())
        );
        assert_eq!(
            check(&s, "migrate_set_downtime", json!({"value": 1})),
            Ok(())
        );
        assert_eq!(
            check(&s, "qmp_capabilities", json!({"enable": ["oob"]})),
            Ok(())
        );
    }

    #[test]
    fn registering_and_retaining() {
        let mut s = Schema::seed().unwrap();
        s.insert(CommandSpec::no_args("query-cpus-fast"));
        assert!(s.contains("query-cpus-fast"));
        s.retain(|name| name.starts_with("query-"));
        assert!(!s.contains("quit"));
        assert!(s.names().all(|n| n.starts_with("query-")));
    }

    #[test]
    fn bad_args_type_is_reported() {
        assert!(matches!(
            CommandSpec::from_args_type("x", "a:Z"),
            Err(SchemaError::BadArgsType { .. })
        ));
        assert_eq!(
            Schema::parse_hx(".name = \"x\",\n").unwrap_err(),
            SchemaError::MissingArgsType("x".into())
        );
    }
}
