//! A codec ready to run: an operator's script in its own runtime, or a field layout. The
//! decoders, the admin API's checks and tries, and JSON commands use it without caring which.

use super::fields::Layout;
use super::script::{Budget, Script};
use super::{CodecError, Reading, Source, Style};

pub enum Engine {
    Script(Box<Script>),
    Fields(Layout),
}

impl Engine {
    /// `source` compiled (a script) or checked (a layout).
    pub fn build(source: &Source, budget: Budget) -> Result<Engine, CodecError> {
        match source {
            Source::Script(s) => Script::compile(s, budget).map(|s| Engine::Script(Box::new(s))),
            Source::Fields(layout) => Ok(Engine::Fields(layout.clone())),
        }
    }

    pub fn style(&self) -> Style {
        match self {
            Engine::Script(s) => s.style(),
            Engine::Fields(l) => l.style,
        }
    }

    /// Whether it reads Alibaba's custom topics (a script's `transformPayload`).
    pub fn transforms(&self) -> bool {
        match self {
            Engine::Script(s) => s.transforms(),
            Engine::Fields(_) => false,
        }
    }

    /// An uplink's bytes as JSON.
    pub fn read(&mut self, reading: Reading, topic: &str, bytes: &[u8]) -> Result<serde_json::Value, CodecError> {
        match self {
            Engine::Script(s) => s.read(reading, topic, bytes),
            Engine::Fields(l) => l.decode(bytes).map_err(|e| CodecError::Unfit(format!("the frame does not fit: {e}"))),
        }
    }

    /// A JSON message as the device's bytes.
    pub fn write(&mut self, message: &serde_json::Value) -> Result<Vec<u8>, CodecError> {
        match self {
            Engine::Script(s) => s.write(message),
            Engine::Fields(l) => {
                l.encode(message).map_err(|e| CodecError::Unfit(format!("the command does not fit: {e}")))
            }
        }
    }
}
