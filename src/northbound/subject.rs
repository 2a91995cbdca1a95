//! Where events and commands travel on a streaming engine: one subject (NATS) or topic (MQTT) per
//! instance, product, device and event kind, `<prefix>.<instance>.<pk>.<dn>.<kind>` with the
//! engine's separator, and `<...>.<dn>.command` for commands in.
//!
//! Product keys and instance names are letters, digits, `_` and `-`, which both engines take as
//! they are. A device name may also hold `@`, `:` and `.`; the `.` would split a NATS subject, so
//! there it is written `%2E` (a `%` is never in a name, so the mapping is one to one).

use super::event::EventKind;

/// The word of a command subject or topic after the device name.
const COMMAND: &str = "command";
/// After the command topic: where MQTT commands are answered.
const ANSWER: &str = "answer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Nats,
    Mqtt,
}

impl Engine {
    fn separator(self) -> char {
        match self {
            Engine::Nats => '.',
            Engine::Mqtt => '/',
        }
    }

    /// Matches any one level.
    fn one_level(self) -> &'static str {
        match self {
            Engine::Nats => "*",
            Engine::Mqtt => "+",
        }
    }
}

/// This instance's names on one engine.
#[derive(Debug, Clone)]
pub struct Names {
    engine: Engine,
    /// `<prefix><sep><instance>`.
    base: String,
}

impl Names {
    pub fn new(engine: Engine, prefix: &str, instance: &str) -> Names {
        Names { engine, base: format!("{prefix}{}{instance}", engine.separator()) }
    }

    fn device(&self, pk: &str, dn: &str) -> String {
        let sep = self.engine.separator();
        let dn = match self.engine {
            Engine::Nats => dn.replace('.', "%2E"),
            Engine::Mqtt => dn.to_string(),
        };
        format!("{}{sep}{pk}{sep}{dn}", self.base)
    }

    /// Where an event of `kind` about device `pk`/`dn` is published.
    pub fn event(&self, pk: &str, dn: &str, kind: EventKind) -> String {
        format!("{}{}{}", self.device(pk, dn), self.engine.separator(), kind.as_str())
    }

    /// What to subscribe to for every device's commands.
    pub fn commands(&self) -> String {
        let (sep, any) = (self.engine.separator(), self.engine.one_level());
        format!("{}{sep}{any}{sep}{any}{sep}{COMMAND}", self.base)
    }

    /// Where an MQTT command for `pk`/`dn` is answered.
    pub fn answer(&self, pk: &str, dn: &str) -> String {
        let sep = self.engine.separator();
        format!("{}{sep}{COMMAND}{sep}{ANSWER}", self.device(pk, dn))
    }

    /// The (product key, device name) a command subject or topic names; None for anything else.
    /// The names are as written: whether such a device exists is the admin API's to say.
    pub fn command_device(&self, subject: &str) -> Option<(String, String)> {
        let sep = self.engine.separator();
        let rest = subject.strip_prefix(self.base.as_str())?.strip_prefix(sep)?;
        let mut levels = rest.split(sep);
        let (pk, dn, word) = (levels.next()?, levels.next()?, levels.next()?);
        if word != COMMAND || levels.next().is_some() || pk.is_empty() || dn.is_empty() {
            return None;
        }
        let dn = match self.engine {
            Engine::Nats => dn.replace("%2E", "."),
            Engine::Mqtt => dn.to_string(),
        };
        Some((pk.to_string(), dn))
    }

    /// The stream subjects that hold every event kind of every instance under `prefix`, and no
    /// command subject (a stream holding those would answer command requests itself).
    pub fn all_events(prefix: &str) -> Vec<String> {
        EventKind::ALL.iter().map(|k| format!("{prefix}.*.*.*.{}", k.as_str())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_topics_name_instance_device_and_kind() {
        let nats = Names::new(Engine::Nats, "nbhub", "east");
        assert_eq!(nats.event("pk1", "meter-7", EventKind::Uplink), "nbhub.east.pk1.meter-7.uplink");
        assert_eq!(nats.event("pk1", "a.b@c:d", EventKind::DeviceStatus), "nbhub.east.pk1.a%2Eb@c:d.device_status");
        assert_eq!(nats.commands(), "nbhub.east.*.*.command");
        let mqtt = Names::new(Engine::Mqtt, "fleet/nb", "east");
        assert_eq!(mqtt.event("pk1", "a.b", EventKind::CommandStatus), "fleet/nb/east/pk1/a.b/command_status");
        assert_eq!(mqtt.commands(), "fleet/nb/east/+/+/command");
        assert_eq!(mqtt.answer("pk1", "a.b"), "fleet/nb/east/pk1/a.b/command/answer");
    }

    #[test]
    fn command_subjects_name_their_device_and_nothing_else_does() {
        let nats = Names::new(Engine::Nats, "nbhub", "east");
        let pair = |p: &str, d: &str| Some((p.to_string(), d.to_string()));
        assert_eq!(nats.command_device("nbhub.east.pk1.a%2Eb.command"), pair("pk1", "a.b"));
        for other in [
            "nbhub.west.pk1.dn.command",
            "nbhub.east.pk1.dn.uplink",
            "nbhub.east.pk1.dn.command.x",
            "nbhub.east.pk1.command",
            "nbhub.eastpk1.dn.command",
            "nbhub.east..dn.command",
        ] {
            assert_eq!(nats.command_device(other), None, "{other}");
        }
        let mqtt = Names::new(Engine::Mqtt, "nbhub", "east");
        assert_eq!(mqtt.command_device("nbhub/east/pk1/a.b/command"), pair("pk1", "a.b"));
        assert_eq!(mqtt.command_device("nbhub/east/pk1/a.b/command/answer"), None);
    }

    #[test]
    fn the_default_stream_holds_every_event_kind_and_no_command() {
        let subjects = Names::all_events("nbhub");
        assert_eq!(subjects.len(), EventKind::ALL.len());
        assert!(subjects.contains(&"nbhub.*.*.*.uplink".to_string()));
        assert!(!subjects.iter().any(|s| s.ends_with(COMMAND) || s.ends_with('>')));
    }
}
