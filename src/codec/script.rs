//! An operator's codec script in an embedded QuickJS runtime of its own: compiled once, called
//! per message with a deadline, a memory limit and a stack limit. The script sees only the
//! language's built-ins and a rate-limited `console.log`; nothing of the host.
//!
//! The entry points are the vendors' own (seed 002 §9 for Alibaba's data parsing, seed 003 §4.4
//! for Huawei's JavaScript codec), called the way each platform calls them, so a script written
//! for either runs here unmodified.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::function::Rest;
use rquickjs::{Array, CaughtError, Context, Ctx, Function, Object, Runtime, Value};

use super::{CodecError, Reading, Style};

/// What one call may spend.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
    pub stack_bytes: usize,
}

impl From<&crate::config::CodecConfig> for Budget {
    fn from(c: &crate::config::CodecConfig) -> Budget {
        Budget {
            call_timeout: Duration::from_millis(c.call_timeout_ms),
            memory_bytes: c.memory_mb << 20,
            stack_bytes: c.stack_kb << 10,
        }
    }
}

/// A decoded result larger than this is refused: it is stored with every message.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Longest script message kept with an error.
const MAX_MESSAGE: usize = 1024;
/// `console.log` lines a runtime may write per second; the rest are only counted.
const LOG_LINES_PER_S: u32 = 5;

/// The functions a script may define, by the vendors' names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    RawDataToProtocol,
    ProtocolToRawData,
    TransformPayload,
    Decode,
    Encode,
}

impl Entry {
    const ALL: [Entry; 5] =
        [Entry::RawDataToProtocol, Entry::ProtocolToRawData, Entry::TransformPayload, Entry::Decode, Entry::Encode];

    fn name(self) -> &'static str {
        match self {
            Entry::RawDataToProtocol => "rawDataToProtocol",
            Entry::ProtocolToRawData => "protocolToRawData",
            Entry::TransformPayload => "transformPayload",
            Entry::Decode => "decode",
            Entry::Encode => "encode",
        }
    }

    fn style(self) -> Style {
        match self {
            Entry::Decode | Entry::Encode => Style::Huawei,
            _ => Style::Alibaba,
        }
    }
}

/// When the call under way must stop, and whether the interrupt handler stopped it.
#[derive(Default)]
struct Deadline {
    at: Cell<Option<Instant>>,
    fired: Cell<bool>,
}

/// A compiled script, ready to be called.
pub struct Script {
    // Dropped in this order: the context before its runtime.
    context: Context,
    runtime: Runtime,
    deadline: Rc<Deadline>,
    budget: Budget,
    style: Style,
    defined: [bool; 5],
}

impl Script {
    /// Runs `source` once (its top level, under the same budget as a call) and finds which
    /// vendor's functions it defines.
    pub fn compile(source: &str, budget: Budget) -> Result<Script, CodecError> {
        let runtime = Runtime::new().map_err(|e| CodecError::Compile(e.to_string()))?;
        runtime.set_memory_limit(budget.memory_bytes);
        runtime.set_max_stack_size(budget.stack_bytes);
        let deadline = Rc::new(Deadline::default());
        let watch = deadline.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || {
            let late = watch.at.get().is_some_and(|at| Instant::now() >= at);
            if late {
                watch.fired.set(true);
            }
            late
        })));
        let context = Context::full(&runtime).map_err(|e| CodecError::Compile(e.to_string()))?;
        let mut script =
            Script { context, runtime, deadline, budget, style: Style::Alibaba, defined: [false; Entry::ALL.len()] };
        script
            .guarded(|ctx| {
                install_console(&ctx)?;
                // Vendor scripts are ES5 written for sloppy mode (undeclared variables included).
                let mut options = EvalOptions::default();
                options.strict = false;
                options.filename = Some("codec.js".into());
                ctx.eval_with_options::<(), _>(source, options)
            })
            .map_err(|e| match e {
                CodecError::Thrown(m) => CodecError::Compile(m),
                other => other,
            })?;
        script.defined = script
            .context
            .with(|ctx| Entry::ALL.map(|e| ctx.globals().get::<_, Value>(e.name()).is_ok_and(|v| v.is_function())));
        let of = |style| Entry::ALL.iter().zip(script.defined).filter(|(e, d)| *d && e.style() == style).count();
        script.style = match (of(Style::Alibaba), of(Style::Huawei)) {
            (0, 0) => {
                return Err(CodecError::Compile(
                    "the script defines none of Alibaba's rawDataToProtocol, protocolToRawData, transformPayload \
                     nor Huawei's decode, encode"
                        .into(),
                ));
            }
            (_, 0) => Style::Alibaba,
            (0, _) => Style::Huawei,
            _ => {
                return Err(CodecError::Compile(
                    "the script defines both Alibaba's and Huawei's functions: keep one vendor's".into(),
                ));
            }
        };
        Ok(script)
    }

    pub fn style(&self) -> Style {
        self.style
    }

    /// Whether it defines Alibaba's `transformPayload` (custom topics are decoded only then).
    pub fn transforms(&self) -> bool {
        self.defines(Entry::TransformPayload)
    }

    fn defines(&self, entry: Entry) -> bool {
        self.defined[Entry::ALL.iter().position(|e| *e == entry).expect("listed")]
    }

    fn entry(&self, entry: Entry) -> Result<Entry, CodecError> {
        if self.defines(entry) { Ok(entry) } else { Err(CodecError::Missing(entry.name())) }
    }

    /// An uplink's bytes as the script reads them.
    pub fn read(&mut self, reading: Reading, topic: &str, bytes: &[u8]) -> Result<serde_json::Value, CodecError> {
        let entry = match (self.style, reading) {
            (Style::Huawei, _) => self.entry(Entry::Decode)?,
            (_, Reading::Raw) => self.entry(Entry::RawDataToProtocol)?,
            (_, Reading::Custom) => self.entry(Entry::TransformPayload)?,
        };
        self.guarded(|ctx| {
            let f: Function = ctx.globals().get(entry.name())?;
            let result: Value = match entry {
                // Huawei's codec takes unsigned bytes and the topic (none for its CoAP devices).
                Entry::Decode => {
                    let topic = match reading {
                        Reading::Custom => rquickjs::String::from_str(ctx.clone(), topic)?.into_value(),
                        Reading::Raw => Value::new_null(ctx.clone()),
                    };
                    f.call((byte_array(&ctx, bytes, false)?, topic))?
                }
                // Alibaba passes Java's signed bytes, which its scripts mask with `& 0xFF`.
                Entry::TransformPayload => f.call((topic, byte_array(&ctx, bytes, true)?))?,
                _ => f.call((byte_array(&ctx, bytes, true)?,))?,
            };
            // Huawei's decode returns a JSON string; a script that returns the object is taken too.
            let json = match result.as_string() {
                Some(s) if entry == Entry::Decode => s.to_string()?,
                _ => ctx.json_stringify(result)?.map(|s| s.to_string()).transpose()?.unwrap_or_default(),
            };
            Ok(json)
        })
        .and_then(|json| {
            if json.len() > MAX_RESULT_BYTES {
                return Err(CodecError::BadResult(format!(
                    "{} returned {} bytes of JSON; at most {MAX_RESULT_BYTES} are kept",
                    entry.name(),
                    json.len()
                )));
            }
            match serde_json::from_str::<serde_json::Value>(&json) {
                Ok(serde_json::Value::Null) => Err(CodecError::BadResult(format!("{} returned nothing", entry.name()))),
                Ok(v) => Ok(v),
                Err(_) if json.is_empty() => Err(CodecError::BadResult(format!("{} returned nothing", entry.name()))),
                Err(e) => Err(CodecError::BadResult(format!("{} did not return JSON: {e}", entry.name()))),
            }
        })
    }

    /// A JSON message (a command, a reply) as the bytes the script writes for the device.
    pub fn write(&mut self, message: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
        let entry = match self.style {
            Style::Huawei => self.entry(Entry::Encode)?,
            _ => self.entry(Entry::ProtocolToRawData)?,
        };
        let json = message.to_string();
        self.guarded(|ctx| {
            let f: Function = ctx.globals().get(entry.name())?;
            let result: Value = match entry {
                // Huawei's encode takes the JSON text, Alibaba's the object.
                Entry::Encode => f.call((json.as_str(),))?,
                _ => f.call((ctx.json_parse(json.as_str())?,))?,
            };
            result_bytes(&ctx, result)
        })?
        .map_err(|what| CodecError::BadResult(format!("{} must return an array of byte values; {what}", entry.name())))
    }

    /// Runs `f` under the call budget, mapping whatever stopped it to the error that says why.
    fn guarded<T>(&mut self, f: impl for<'js> FnOnce(Ctx<'js>) -> rquickjs::Result<T>) -> Result<T, CodecError> {
        self.deadline.fired.set(false);
        self.deadline.at.set(Some(Instant::now() + self.budget.call_timeout));
        let result = self.context.with(|ctx| match f(ctx.clone()) {
            Ok(v) => Ok(v),
            Err(e) => Err(describe(CaughtError::from_error(&ctx, e))),
        });
        self.deadline.at.set(None);
        match result {
            Ok(v) => Ok(v),
            Err(_) if self.deadline.fired.get() => Err(CodecError::Timeout(self.budget.call_timeout)),
            Err(m) if m.contains("out of memory") || m.contains("Allocation failed") => {
                Err(CodecError::Memory(self.budget.memory_bytes))
            }
            Err(m) => Err(CodecError::Thrown(m)),
        }
    }

    /// Bytes the runtime holds now (after a collection), for tests and metrics.
    pub fn memory_used(&self) -> usize {
        self.runtime.run_gc();
        self.runtime.memory_usage().memory_used_size as usize
    }
}

/// An exception as the operator needs to see it: its message and where it was thrown.
fn describe(caught: CaughtError<'_>) -> String {
    let text = match caught {
        CaughtError::Exception(e) => {
            // "TypeError: …" as a browser prints it: the kind says as much as the text.
            let message = match (e.get::<_, Option<String>>("name").ok().flatten(), e.message()) {
                (Some(name), Some(m)) if !name.is_empty() => format!("{name}: {m}"),
                (_, m) => m.unwrap_or_default(),
            };
            match e.stack().filter(|s| !s.trim().is_empty()) {
                Some(stack) => format!("{message}\n{}", stack.trim_end()),
                None => message,
            }
        }
        CaughtError::Value(v) => match v.as_string().and_then(|s| s.to_string().ok()) {
            Some(s) => format!("threw {s:?}"),
            None => format!("threw a {}", v.type_name()),
        },
        CaughtError::Error(e) => e.to_string(),
    };
    let mut text = text;
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// `bytes` as a JS array of numbers, signed (-128..=127) or not (0..=255).
fn byte_array<'js>(ctx: &Ctx<'js>, bytes: &[u8], signed: bool) -> rquickjs::Result<Array<'js>> {
    let array = Array::new(ctx.clone())?;
    for (i, b) in bytes.iter().enumerate() {
        let v = if signed { *b as i8 as i32 } else { *b as i32 };
        array.set(i, v)?;
    }
    Ok(array)
}

/// The bytes a script returned: an array (or typed array) of numbers, each taken modulo 256 as
/// both vendors do (scripts write `-1` and `0xFF` alike). `Err` says what was wrong.
fn result_bytes<'js>(ctx: &Ctx<'js>, result: Value<'js>) -> rquickjs::Result<Result<Vec<u8>, String>> {
    let array = match result.as_array() {
        Some(a) => a.clone(),
        None => {
            // A Uint8Array or similar: read it through Array.from.
            let is_view: bool =
                ctx.eval::<Function, _>("(v) => ArrayBuffer.isView(v)")?.call((result.clone(),)).unwrap_or(false);
            if !is_view {
                return Ok(Err(format!("it returned a {}", result.type_name())));
            }
            let from: Function = ctx.eval("(v) => Array.from(v)")?;
            from.call::<_, Array>((result,))?
        }
    };
    let mut out = Vec::with_capacity(array.len());
    for (i, v) in array.iter::<Value>().enumerate() {
        let v = v?;
        match v.as_number() {
            Some(n) if n.is_finite() && n.fract() == 0.0 => out.push((n as i64).rem_euclid(256) as u8),
            _ => return Ok(Err(format!("element {i} is a {}, not an integer", v.type_name()))),
        }
    }
    Ok(Ok(out))
}

/// `console.log` (and its usual siblings) to the server's log at debug level, at most
/// [`LOG_LINES_PER_S`] lines a second.
fn install_console(ctx: &Ctx<'_>) -> rquickjs::Result<()> {
    let window = Rc::new(Cell::new((Instant::now(), 0u32)));
    let console = Object::new(ctx.clone())?;
    for name in ["log", "info", "warn", "error", "debug"] {
        let window = window.clone();
        let log = Function::new(ctx.clone(), move |args: Rest<rquickjs::convert::Coerced<String>>| {
            let (start, lines) = window.get();
            let (start, lines) =
                if start.elapsed() >= Duration::from_secs(1) { (Instant::now(), 0) } else { (start, lines) };
            window.set((start, lines + 1));
            if lines < LOG_LINES_PER_S {
                let line: Vec<String> = args.0.into_iter().map(|c| c.0).collect();
                tracing::debug!(target: "nbhub::codec::console", "{}", line.join(" "));
            } else {
                metrics::counter!(crate::telemetry::metric::CODEC_LOG_DROPPED).increment(1);
            }
        })?;
        console.set(name, log)?;
    }
    ctx.globals().set("console", console)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget { call_timeout: Duration::from_millis(50), memory_bytes: 16 << 20, stack_bytes: 256 << 10 }
    }

    const ALIBABA: &str = r#"
        var COMMAND_REPORT = 0x00;
        function rawDataToProtocol(bytes) {
            var uint8Array = new Uint8Array(bytes.length);
            for (var i = 0; i < bytes.length; i++) { uint8Array[i] = bytes[i] & 0xff; }
            var dataView = new DataView(uint8Array.buffer, 0);
            var jsonMap = new Object();
            var fHead = uint8Array[0];
            if (fHead == COMMAND_REPORT) {
                jsonMap['method'] = 'thing.event.property.post';
                jsonMap['version'] = '1.0';
                jsonMap['id'] = '' + dataView.getInt32(1);
                var params = {};
                params['temperature'] = dataView.getInt16(5) / 10;
                jsonMap['params'] = params;
            }
            return jsonMap;
        }
        function protocolToRawData(json) {
            var params = json['params'];
            var payloadArray = [0x01];
            payloadArray = payloadArray.concat(buffer_int32(parseInt(json['id'])));
            payloadArray = payloadArray.concat([params['switch'] ? 1 : 0, -1]);
            return payloadArray;
        }
        function buffer_int32(value) {
            var uint8Array = new Int32Array(1);
            var dv = new DataView(uint8Array.buffer, 0);
            dv.setInt32(0, value);
            return [].slice.call(new Int8Array(uint8Array.buffer));
        }
    "#;

    #[test]
    fn alibaba_scripts_read_signed_bytes_and_write_arrays() {
        let mut s = Script::compile(ALIBABA, budget()).unwrap();
        assert_eq!(s.style(), Style::Alibaba);
        assert!(!s.transforms());
        // 0x00, id 7, temperature -12.5 (0xFF83 = -125 tenths)
        let v = s.read(Reading::Raw, "/sys/pk/dn/thing/model/up_raw", &[0, 0, 0, 0, 7, 0xFF, 0x83]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"method": "thing.event.property.post", "version": "1.0", "id": "7",
                                "params": {"temperature": -12.5}})
        );
        let bytes = s.write(&serde_json::json!({"id": "258", "params": {"switch": true}})).unwrap();
        assert_eq!(bytes, [1, 0, 0, 1, 2, 1, 0xFF]);
        assert_eq!(s.read(Reading::Custom, "/pk/dn/user/x", &[1]), Err(CodecError::Missing("transformPayload")));
    }

    #[test]
    fn huawei_scripts_read_unsigned_bytes_and_return_json_text() {
        let src = r#"
            function decode(payload, topic) {
                var jsonObj = {};
                if (payload[0] == 0xAA) {
                    jsonObj = {"msgType": "deviceReq", "data": [{"serviceId": "Meter",
                               "serviceData": {"level": payload[1], "topic": topic}}]};
                }
                return JSON.stringify(jsonObj);
            }
            function encode(json) {
                var obj = JSON.parse(json);
                return [0xA1, obj.paras.value & 0xFF, (obj.mid >> 8) & 0xFF, obj.mid & 0xFF];
            }
        "#;
        let mut s = Script::compile(src, budget()).unwrap();
        assert_eq!(s.style(), Style::Huawei);
        let v = s.read(Reading::Raw, "/t/d", &[0xAA, 200]).unwrap();
        assert_eq!(v["data"][0]["serviceData"], serde_json::json!({"level": 200, "topic": null}));
        let cmd = serde_json::json!({"msgType": "cloudReq", "serviceId": "Meter", "cmd": "SET", "paras": {"value": 300}, "hasMore": 0, "mid": 513});
        assert_eq!(s.write(&cmd).unwrap(), [0xA1, 44, 2, 1]);
    }

    #[test]
    fn a_script_is_stopped_by_its_budget_and_says_why() {
        let src = r#"
            function decode(p) {
                if (p[0] == 1) { throw new Error("bad frame " + p.length); }
                if (p[0] == 2) { while (true) {} }
                if (p[0] == 3) { var a = []; while (true) { a.push(new Array(1000).fill(7)); } }
                if (p[0] == 4) { return 42; }
                if (p[0] == 5) { return "not json"; }
                if (p[0] == 6) { function f(n) { return f(n + 1) + 1; } return f(0); }
                return JSON.stringify({ok: true});
            }
        "#;
        let mut s = Script::compile(src, budget()).unwrap();
        let read = |s: &mut Script, b: u8| s.read(Reading::Raw, "/t/d", &[b, 0]);
        match read(&mut s, 1) {
            Err(CodecError::Thrown(m)) => {
                assert!(m.starts_with("Error: bad frame 2\n") && m.contains("codec.js"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(read(&mut s, 2), Err(CodecError::Timeout(Duration::from_millis(50))));
        assert_eq!(read(&mut s, 3), Err(CodecError::Memory(16 << 20)));
        assert_eq!(read(&mut s, 4).unwrap(), serde_json::json!(42));
        assert!(matches!(read(&mut s, 5), Err(CodecError::BadResult(m)) if m.contains("did not return JSON")));
        assert!(matches!(read(&mut s, 6), Err(CodecError::Thrown(_))));
        // A fresh runtime after a stop works as the first did.
        let mut s = Script::compile(src, budget()).unwrap();
        assert_eq!(read(&mut s, 0).unwrap(), serde_json::json!({"ok": true}));
    }

    #[test]
    fn what_cannot_be_a_codec_is_refused_at_compile() {
        let compile = |src: &str| match Script::compile(src, budget()) {
            Err(CodecError::Compile(m)) => m,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("compiled"),
        };
        let syntax = compile("function decode( {");
        assert!(syntax.starts_with("SyntaxError: ") && syntax.contains("codec.js:1"), "{syntax}");
        assert!(compile("var x = 1;").contains("defines none"));
        assert!(compile("function decode(){} function rawDataToProtocol(){}").contains("both"));
        assert!(compile("throw new Error('at load')").contains("at load"));
        assert!(matches!(Script::compile("while(true){}", budget()), Err(CodecError::Timeout(_))));
        // Sloppy mode, as the vendors run them: an undeclared variable is a global.
        let mut s =
            Script::compile("function decode(p) { n = p.length; return JSON.stringify({n: n}); }", budget()).unwrap();
        assert_eq!(s.read(Reading::Raw, "/t/d", &[1, 2]).unwrap(), serde_json::json!({"n": 2}));
        // The host is out of reach.
        let mut s = Script::compile(
            "function decode(p) { return JSON.stringify({std: typeof std, os: typeof os, require: typeof require}); }",
            budget(),
        )
        .unwrap();
        assert_eq!(
            s.read(Reading::Raw, "/t/d", &[]).unwrap(),
            serde_json::json!({"std": "undefined", "os": "undefined", "require": "undefined"})
        );
    }

    #[test]
    fn bad_encodings_are_named() {
        let mut s = Script::compile("function encode(j) { return j.length > 10 ? 'x' : [1, 1.5]; }", budget()).unwrap();
        let err = s.write(&serde_json::json!({"mid": 1, "paras": {}})).unwrap_err();
        assert!(matches!(&err, CodecError::BadResult(m) if m.contains("it returned a string")), "{err:?}");
        let err = s.write(&serde_json::json!(1)).unwrap_err();
        assert!(matches!(&err, CodecError::BadResult(m) if m.contains("element 1")), "{err:?}");
        let mut s = Script::compile("function encode(j) { return new Uint8Array([1, 2, 300]); }", budget()).unwrap();
        assert_eq!(s.write(&serde_json::json!({})).unwrap(), [1, 2, 44]);
    }
}
