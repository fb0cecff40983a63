//! QMP messages and the per-connection protocol state machine, as QEMU 7.2
//! behaves on the wire: the greeting, capabilities negotiation, request
//! checks with QEMU's error texts, and reply/event framing (one line of
//! JSON ending in "\r\n" per message).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::schema::Schema;
use crate::stream::StreamItem;
use crate::writer::{qdict_order, write_string, write_value};

/// The error classes QEMU 7.2 reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{}: {desc}", class.as_str())]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A GenericError, the class of almost every failure.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    pub fn command_not_found(command: &str) -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    pub fn device_not_found(device: &str) -> Self {
        QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{device}' not found"),
        )
    }
}

/// What the greeting announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreetingInfo {
    /// The QEMU version whose command set we implement.
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// Our own name and version.
    pub package: String,
    /// Offer the "oob" capability. QEMU 7.2 offers it; when a client enables
    /// it, `exec-oob` becomes a known member, and since none of our commands
    /// may run out of band, each `exec-oob` gets QEMU's "does not support OOB"
    /// error, exactly what 7.2 answers for its own in-band-only commands.
    pub offer_oob: bool,
}

impl Default for GreetingInfo {
    fn default() -> Self {
        GreetingInfo {
            major: 7,
            minor: 2,
            micro: 0,
            package: format!("vmm {}", env!("CARGO_PKG_VERSION")),
            offer_oob: true,
        }
    }
}

/// Appends the "\r\n" that ends every server message.
fn line(mut text: String) -> Vec<u8> {
    text.push_str("\r\n");
    text.into_bytes()
}

/// The greeting line, member order as QEMU prints it.
pub fn greeting_line(info: &GreetingInfo) -> Vec<u8> {
    let mut package = String::new();
    write_string(&mut package, &info.package);
    let capabilities = if info.offer_oob { "[\"oob\"]" } else { "[]" };
    line(format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {}, \"minor\": {}, \"major\": {}}}, \"package\": {package}}}, \"capabilities\": {capabilities}}}}}",
        info.micro, info.minor, info.major
    ))
}

/// Builds a top-level message from members; printed in QDict order.
fn message_line(members: Map<String, Value>) -> Vec<u8> {
    let mut out = String::new();
    write_value(&mut out, &Value::Object(members));
    line(out)
}

/// `{"return": value}` plus the request's id.
pub fn success_line(value: Value, id: Option<&Value>) -> Vec<u8> {
    let mut members = Map::new();
    members.insert("return".into(), value);
    if let Some(id) = id {
        members.insert("id".into(), id.clone());
    }
    message_line(members)
}

/// `{"error": {"class", "desc"}}` plus the request's id.
pub fn error_line(error: &QmpError, id: Option<&Value>) -> Vec<u8> {
    let mut body = Map::new();
    body.insert("class".into(), Value::String(error.class.as_str().into()));
    body.insert("desc".into(), Value::String(error.desc.clone()));
    let mut members = Map::new();
    members.insert("error".into(), Value::Object(body));
    if let Some(id) = id {
        members.insert("id".into(), id.clone());
    }
    message_line(members)
}

/// Time of an event, as QEMU stamps it (wall clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since_epoch.as_secs(),
            microseconds: since_epoch.subsec_micros(),
        }
    }
}

/// `{"timestamp": {...}, "event": name, "data": {...}}`; `data` is left out
/// when absent or empty, as QEMU does.
pub fn event_line(name: &str, data: Option<&Map<String, Value>>, timestamp: Timestamp) -> Vec<u8> {
    let mut stamp = Map::new();
    stamp.insert("seconds".into(), Value::from(timestamp.seconds));
    stamp.insert("microseconds".into(), Value::from(timestamp.microseconds));
    let mut members = Map::new();
    members.insert("timestamp".into(), Value::Object(stamp));
    members.insert("event".into(), Value::String(name.into()));
    if let Some(data) = data.filter(|d| !d.is_empty()) {
        members.insert("data".into(), Value::Object(data.clone()));
    }
    message_line(members)
}

/// A request that passed every protocol and argument check.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub command: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// What the connection must do with one input item.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send these bytes (an error, or the reply to qmp_capabilities).
    Reply(Vec<u8>),
    /// Run the command and reply with its result, echoing `id`.
    Dispatch(Request),
}

/// Per-connection negotiation state.
#[derive(Clone, Debug, Default)]
pub struct Session {
    oob_offered: bool,
    negotiated: bool,
    oob_enabled: bool,
}

const NEGOTIATION_ONLY: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";

impl Session {
    pub fn new(oob_offered: bool) -> Self {
        Session {
            oob_offered,
            negotiated: false,
            oob_enabled: false,
        }
    }

    /// Whether qmp_capabilities succeeded; events go only to such sessions.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    pub fn oob_enabled(&self) -> bool {
        self.oob_enabled
    }

    /// Handles one item from the JSON stream, following QEMU 7.2's
    /// qmp_dispatch: parse errors carry no id; then the object checks (in the
    /// order QEMU iterates members), command lookup, argument checks, and
    /// qmp_capabilities itself.
    pub fn handle(&mut self, item: StreamItem, schema: &Schema) -> Action {
        let value = match item {
            Ok(value) => value,
            Err(err) => {
                return Action::Reply(error_line(&QmpError::generic(err.to_string()), None))
            }
        };
        let Value::Object(mut request) = value else {
            return Action::Reply(error_line(
                &QmpError::generic("QMP input must be a JSON object"),
                None,
            ));
        };
        let id = request.get("id").cloned();
        match self.prepare(&mut request, schema) {
            Ok(Some(request)) => Action::Dispatch(Request { id, ..request }),
            Ok(None) => Action::Reply(success_line(Value::Object(Map::new()), id.as_ref())),
            Err(mut error) => {
                if !self.negotiated && error.class == ErrorClass::CommandNotFound {
                    error.desc = NEGOTIATION_ONLY.to_string();
                }
                Action::Reply(error_line(&error, id.as_ref()))
            }
        }
    }

    /// Returns the request to dispatch, or None when it was
    /// qmp_capabilities and has been handled.
    fn prepare(
        &mut self,
        request: &mut Map<String, Value>,
        schema: &Schema,
    ) -> Result<Option<Request>, QmpError> {
        let (command, oob) = self.check_members(request)?;
        // Before negotiation only qmp_capabilities exists.
        let known = if self.negotiated {
            schema.get(&command)
        } else {
            None
        };
        let spec = match (command.as_str(), known) {
            (_, Some(spec)) => spec.clone(),
            ("qmp_capabilities", None) => capabilities_spec(schema),
            _ => return Err(QmpError::command_not_found(&command)),
        };
        if oob {
            return Err(QmpError::generic(format!(
                "The command {command} does not support OOB"
            )));
        }
        let arguments = match request.remove("arguments") {
            Some(Value::Object(arguments)) => arguments,
            _ => Map::new(),
        };
        spec.check(&arguments)?;
        if command == "qmp_capabilities" {
            self.negotiate(&arguments)?;
            return Ok(None);
        }
        Ok(Some(Request {
            command,
            arguments,
            id: None,
        }))
    }

    /// QEMU's qmp_dispatch_check_obj: returns the command and whether it came
    /// as `exec-oob`.
    fn check_members(&self, request: &Map<String, Value>) -> Result<(String, bool), QmpError> {
        let mut exec: Option<(&str, &str)> = None;
        for key in qdict_order(request) {
            let value = &request[key.as_str()];
            match key.as_str() {
                name @ ("execute" | "exec-oob") if name == "execute" || self.oob_enabled => {
                    let Value::String(command) = value else {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{name}' must be a string"
                        )));
                    };
                    if let Some((first, _)) = exec {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{name}' clashes with '{first}'"
                        )));
                    }
                    exec = Some((name, command));
                }
                "arguments" => {
                    if !value.is_object() {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                }
                "id" => {}
                other => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        match exec {
            Some((key, command)) => Ok((command.to_string(), key == "exec-oob")),
            None => Err(QmpError::generic("QMP input lacks member 'execute'")),
        }
    }

    fn negotiate(&mut self, arguments: &Map<String, Value>) -> Result<(), QmpError> {
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let requested: Vec<&str> = match arguments.get("enable") {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let unavailable: Vec<&str> = requested
            .iter()
            .copied()
            .filter(|cap| !(self.oob_offered && *cap == "oob"))
            .collect();
        if !unavailable.is_empty() {
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            )));
        }
        self.oob_enabled = requested.contains(&"oob");
        self.negotiated = true;
        Ok(())
    }
}

/// qmp_capabilities' spec: the schema's if it has one, else the 7.2 one.
fn capabilities_spec(schema: &Schema) -> crate::schema::CommandSpec {
    use crate::schema::{ArgType, CommandSpec, ParamSpec};
    schema.get("qmp_capabilities").cloned().unwrap_or_else(|| {
        CommandSpec::new(
            "qmp_capabilities",
            vec![ParamSpec::optional(
                "enable",
                ArgType::Array(Box::new(ArgType::Enum(vec!["oob".into()]))),
            )],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::JsonStream;

    /// Feeds raw bytes through a stream and a session; returns the reply
    /// lines, with dispatched commands answered `{"return": "<command>"}`.
    struct Harness {
        stream: JsonStream,
        session: Session,
        schema: Schema,
    }

    impl Harness {
        fn new(negotiate: bool) -> Self {
            let mut harness = Harness {
                stream: JsonStream::default(),
                session: Session::new(true),
                schema: Schema::seed().unwrap(),
            };
            if negotiate {
                assert_eq!(
                    harness.send(b"{\"execute\":\"qmp_capabilities\"}"),
                    ["{\"return\": {}}\r\n"]
                );
            }
            harness
        }

        fn send(&mut self, bytes: &[u8]) -> Vec<String> {
            self.stream
                .feed_collect(bytes)
                .into_iter()
                .map(|item| match self.session.handle(item, &self.schema) {
                    Action::Reply(bytes) => String::from_utf8(bytes).unwrap(),
                    Action::Dispatch(request) => String::from_utf8(success_line(
                        Value::String(request.command),
                        request.id.as_ref(),
                    ))
                    .unwrap(),
                })
                .collect()
        }

        /// QEMU's qmp-test check that the connection still works.
        fn still_works(&mut self) {
            let expected = if self.session.negotiated() {
                r#"{"error": {"class": "CommandNotFound", "desc": "The command no-such-cmd has not been found"}}"#
            } else {
                r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
            };
            assert_eq!(
                self.send(b"{\"execute\":\"no-such-cmd\"}"),
                [format!("{expected}\r\n")]
            );
        }
    }

    fn error(desc: &str) -> String {
        let mut text = String::new();
        write_string(&mut text, desc);
        format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": {text}}}}}\r\n")
    }

    #[test]
    fn greeting_matches_qemu_layout() {
        let info = GreetingInfo {
            micro: 22,
            package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into(),
            ..Default::default()
        };
        // Byte for byte what QEMU 7.2.22 (Debian) sends.
        assert_eq!(
            String::from_utf8(greeting_line(&info)).unwrap(),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        let line = greeting_line(&GreetingInfo {
            offer_oob: false,
            ..Default::default()
        });
        let parsed: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            parsed["QMP"]["version"]["qemu"],
            serde_json::json!({"major": 7, "minor": 2, "micro": 0})
        );
        assert_eq!(parsed["QMP"]["capabilities"], serde_json::json!([]));
        assert!(parsed["QMP"]["version"]["package"]
            .as_str()
            .unwrap()
            .starts_with("vmm "));
    }

    /// The malformed inputs of qmp-wire.md (observed on QEMU 7.2.22), before
    /// and after negotiation, each followed by a working command.
    #[test]
    fn malformed_inputs_keep_the_connection_working() {
        let cases: &[(&[u8], String)] = &[
            (
                b"{\"execute\": malformed}",
                error("JSON parse error, invalid keyword 'malformed'"),
            ),
            (b"{]", error("JSON parse error, expecting value")),
            (b"{\xff", error("JSON parse error, stray '\u{fffd}'")),
            (b"{\x01", error("JSON parse error, stray '\u{1}'")),
            (b"[1,2]", error("QMP input must be a JSON object")),
            (b"\"str\"", error("QMP input must be a JSON object")),
            (b"42 ", error("QMP input must be a JSON object")),
            (b"null ", error("QMP input must be a JSON object")),
            (
                b"{\"execute\":1}",
                error("QMP input member 'execute' must be a string"),
            ),
            (
                b"{\"execute\":\"stop\",\"foo\":1}",
                error("QMP input member 'foo' is unexpected"),
            ),
            (
                b"{\"execute\":\"stop\",\"arguments\":[]}",
                error("QMP input member 'arguments' must be an object"),
            ),
            (
                b"{\"arguments\":1,\"foo\":2,\"execute\":3}",
                error("QMP input member 'execute' must be a string"),
            ),
            (
                b"{\"bar\":1,\"foo\":2,\"execute\":\"x\"}",
                error("QMP input member 'bar' is unexpected"),
            ),
            (
                b"{\"exec-oob\":\"query-status\"}",
                error("QMP input member 'exec-oob' is unexpected"),
            ),
        ];
        for negotiate in [false, true] {
            let mut harness = Harness::new(negotiate);
            for (input, expected) in cases {
                assert_eq!(
                    harness.send(input),
                    std::slice::from_ref(expected),
                    "input {:?}",
                    String::from_utf8_lossy(input)
                );
                harness.still_works();
            }
            assert_eq!(
                harness.send(b"{\"id\":\"x\"}"),
                ["{\"id\": \"x\", \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}\r\n"]
            );
            harness.still_works();
        }
    }

    #[test]
    fn negotiation_rules() {
        let mut harness = Harness::new(false);
        assert_eq!(
            harness.send(b"{\"execute\":\"query-status\",\"id\":1}"),
            ["{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"]
        );
        assert_eq!(
            harness
                .send(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"foo\"]}}"),
            [error("Parameter 'null' does not accept value 'foo'")]
        );
        assert_eq!(
            harness.send(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"x\":1}}"),
            [error("Parameter 'x' is unexpected")]
        );
        assert!(!harness.session.negotiated());
        assert_eq!(
            harness.send(b"{'execute':'qmp_capabilities','id':'n'}"),
            ["{\"return\": {}, \"id\": \"n\"}\r\n"]
        );
        assert!(harness.session.negotiated());
        assert_eq!(
            harness.send(b"{\"execute\":\"qmp_capabilities\"}"),
            ["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n"]
        );
        // Argument checks come before the already-negotiated check.
        assert_eq!(
            harness.send(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":\"oob\"}}"),
            [error(
                "Invalid parameter type for 'enable', expected: array"
            )]
        );
        assert_eq!(
            harness.send(b"{\"execute\":\"nonexistent\"}"),
            ["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nonexistent has not been found\"}}\r\n"]
        );
        assert_eq!(
            harness
                .send(b"{\"execute\":\"set_link\",\"arguments\":{\"name\":\"x\",\"up\":\"no\"}}"),
            [error("Invalid parameter type for 'up', expected: boolean")]
        );
        assert_eq!(
            harness.send(b"{\"execute\":\"human-monitor-command\",\"id\":5}"),
            ["{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'command-line' is missing\"}}\r\n"]
        );
    }

    #[test]
    fn oob_capability() {
        let mut harness = Harness::new(false);
        assert_eq!(
            harness
                .send(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}"),
            ["{\"return\": {}}\r\n"]
        );
        assert!(harness.session.oob_enabled());
        assert_eq!(
            harness.send(b"{\"exec-oob\":\"query-status\",\"id\":1}"),
            ["{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"The command query-status does not support OOB\"}}\r\n"]
        );
        assert_eq!(
            harness.send(b"{\"exec-oob\":\"query-status\",\"execute\":\"query-status\",\"id\":1}"),
            ["{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'execute' clashes with 'exec-oob'\"}}\r\n"]
        );
        let mut harness = Harness {
            session: Session::new(false),
            ..Harness::new(false)
        };
        assert_eq!(
            harness
                .send(b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}"),
            [error("Capability oob not available")]
        );
    }

    #[test]
    fn id_echo_of_every_json_type() {
        let mut harness = Harness::new(true);
        let ids: &[(&str, &str)] = &[
            ("\"abc\"", "\"abc\""),
            ("'single'", "\"single\""),
            ("7", "7"),
            ("-0", "0"),
            ("0.1", "0.10000000000000001"),
            ("1e3", "1000"),
            ("18446744073709551615", "18446744073709551615"),
            ("true", "true"),
            ("false", "false"),
            ("null", "null"),
            ("[1, {\"a\": null}]", "[1, {\"a\": null}]"),
            ("{\"b\": 1, \"a\": 2}", "{\"a\": 2, \"b\": 1}"),
            ("\"\\u00e9\"", "\"\\u00E9\""),
        ];
        for (sent, echoed) in ids {
            let request = format!("{{\"execute\":\"query-status\",\"id\":{sent}}}");
            assert_eq!(
                harness.send(request.as_bytes()),
                [format!(
                    "{{\"return\": \"query-status\", \"id\": {echoed}}}\r\n"
                )]
            );
        }
    }

    #[test]
    fn events_and_replies_format() {
        let mut data = Map::new();
        data.insert("guest".into(), Value::Bool(false));
        data.insert("reason".into(), Value::String("host-qmp-quit".into()));
        let stamp = Timestamp {
            seconds: 1795586127,
            microseconds: 715549,
        };
        assert_eq!(
            String::from_utf8(event_line("SHUTDOWN", Some(&data), stamp)).unwrap(),
            "{\"timestamp\": {\"seconds\": 1795586127, \"microseconds\": 715549}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n"
        );
        assert_eq!(
            String::from_utf8(event_line("STOP", Some(&Map::new()), stamp)).unwrap(),
            "{\"timestamp\": {\"seconds\": 1795586127, \"microseconds\": 715549}, \"event\": \"STOP\"}\r\n"
        );
        let error = QmpError::new(
            ErrorClass::DeviceNotActive,
            "No balloon device has been activated",
        );
        assert_eq!(
            String::from_utf8(error_line(&error, None)).unwrap(),
            "{\"error\": {\"class\": \"DeviceNotActive\", \"desc\": \"No balloon device has been activated\"}}\r\n"
        );
    }
}
