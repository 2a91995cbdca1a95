//! Streaming to NATS JetStream and MQTT against the real servers from Debian's packages
//! (`nats-server -js`, `mosquitto`), started here on loopback ports: simulated Huawei devices
//! report over UDP, the events arrive in the stream or on the broker, and commands sent through
//! the engines reach the devices. nbhub is killed with -9 and the brokers are restarted in the
//! middle of the stream.

mod common;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use nbhub::coap::message::Code;
use serde_json::{Value, json};

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child, signal: i32) {
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

/// A broker from Debian's packages on a loopback port, its store in a temporary directory that
/// outlives its restarts.
struct Broker {
    program: &'static str,
    args: Vec<String>,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    /// `nats-server` with JetStream.
    fn nats() -> Broker {
        let (port, dir) = (reserve_port().port(), tempfile::tempdir().unwrap());
        let store = dir.path().join("js").display().to_string();
        let args = ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", &store].map(String::from).into();
        Broker::start("nats-server", args, port, dir)
    }

    /// `mosquitto` with persistence.
    fn mosquitto() -> Broker {
        let (port, dir) = (reserve_port().port(), tempfile::tempdir().unwrap());
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence true\npersistence_location {}/\n",
            dir.path().display()
        );
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        Broker::start("mosquitto", vec!["-c".into(), path.display().to_string()], port, dir)
    }

    fn start(program: &'static str, args: Vec<String>, port: u16, dir: tempfile::TempDir) -> Broker {
        let mut b = Broker { program, args, child: None, port, dir };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", self.program))).unwrap();
        let child = Command::new(self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/install-deps installs it): {e}", self.program));
        self.child = Some(child);
        wait_listening(self.port, self.program);
    }

    fn url(&self) -> String {
        let scheme = if self.program == "mosquitto" { "mqtt" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops (SIGTERM); `spawn` starts it again on the same port and store.
    fn stop(&mut self) {
        stop(self.child.as_mut().unwrap(), libc::SIGTERM);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            stop(c, libc::SIGKILL);
        }
    }
}

/// A test's own NATS client: reads the stream back and sends command requests.
struct NatsClient {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
}

/// One message of the stream: its subject, the event, and its Nats-Msg-Id.
#[derive(Debug, Clone)]
struct Streamed {
    subject: String,
    event: Value,
    msg_id: String,
}

impl NatsClient {
    fn connect(url: &str) -> NatsClient {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = runtime.block_on(async_nats::connect(url)).expect("connect to nats-server");
        NatsClient { runtime, client }
    }

    /// Every message in stream `name`, in stream order.
    fn stream(&self, name: &str) -> Vec<Streamed> {
        self.runtime.block_on(async {
            let js = async_nats::jetstream::new(self.client.clone());
            let Ok(mut stream) = js.get_stream(name).await else { return Vec::new() };
            let state = stream.info().await.unwrap().state.clone();
            let mut out = Vec::new();
            for seq in state.first_sequence..=state.last_sequence {
                let Ok(m) = stream.get_raw_message(seq).await else { continue };
                let msg_id = m.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
                let event = serde_json::from_slice(&m.payload).unwrap();
                out.push(Streamed { subject: m.subject.to_string(), event, msg_id });
            }
            out
        })
    }

    /// A request and its answer: the Nbhub-Status header and the JSON body.
    fn request(&self, subject: &str, body: &Value) -> (u16, Value) {
        self.runtime.block_on(async {
            let m = self
                .client
                .request(subject.to_string(), body.to_string().into())
                .await
                .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
            let status = m.headers.as_ref().and_then(|h| h.get("Nbhub-Status")).unwrap().to_string();
            (status.parse().unwrap(), serde_json::from_slice(&m.payload).unwrap())
        })
    }
}

/// A product whose devices sleep a second after they last spoke.
fn streamed() -> Value {
    json!({"name": "streamed meters", "awake_window_s": 1})
}

fn payload(event: &Value) -> Vec<u8> {
    STANDARD.decode(event["data"]["payload_base64"].as_str().unwrap()).unwrap()
}

/// The uplink payloads of device `dn` in stream order.
fn uplinks(stream: &[Streamed], dn: &str) -> Vec<Vec<u8>> {
    stream
        .iter()
        .filter(|m| m.event["event"] == "uplink" && m.event["device_name"] == dn)
        .map(|m| payload(&m.event))
        .collect()
}

fn reports(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| format!("reading {i}").into_bytes()).collect()
}

/// Confirmed reports before and after a kill -9 of nbhub (the acknowledged ones are in the outbox
/// and the engine's copies are published again), then while the broker is down (the device is
/// still acknowledged and the outlet falls behind) and after it is back; what was sent.
fn through_a_crash_and_an_outage(
    server: &mut Server,
    dev: &mut HuaweiDevice,
    broker: &mut Broker,
    outlet: &str,
) -> Vec<Vec<u8>> {
    let send = |dev: &mut HuaweiDevice, range| {
        reports(range).into_iter().inspect(|r| dev.report_confirmed(r)).collect::<Vec<_>>()
    };
    let mut sent = send(dev, 0..10);
    server.restart();
    dev.wire.server = server.endpoints.coap;
    sent.extend(send(dev, 10..20));
    broker.stop();
    sent.extend(send(dev, 20..30));
    server.wait_metric(&format!(r#"nbhub_outlet_lag_events{{outlet="{outlet}"}}"#), |v| v >= 10.0);
    broker.spawn();
    sent
}

#[test]
fn events_reach_jetstream_once_in_order_across_kill_9_and_a_broker_restart() {
    let mut nats = Broker::nats();
    let env = [("NBHUB_NATS_URL", nats.url()), ("NBHUB_CLUSTER_NAME", "east".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with(&env);
    let client = NatsClient::connect(&nats.url());
    let node = "861234567890201";
    let (pk, dn) = server.huawei_device(node, streamed());
    let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
    dev.bind();
    let sent = through_a_crash_and_an_outage(&mut server, &mut dev, &mut nats, "nats");
    let stream = eventually(|| client.stream("NBHUB"), |s| uplinks(s, &dn).len() >= sent.len(), |s| format!("{s:#?}"));
    assert_eq!(uplinks(&stream, &dn), sent, "every acknowledged uplink once, in order");
    let ids: HashSet<&str> = stream.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), stream.len(), "one message per event id");
    for m in &stream {
        let e = &m.event;
        let (id, kind) = (e["event_id"].as_str().unwrap(), e["event"].as_str().unwrap());
        assert_eq!(m.msg_id, format!("east:{id}"));
        assert_eq!(m.subject, format!("nbhub.east.{}.{}.{kind}", e["product_key"].as_str().unwrap(), dn));
    }
    assert!(stream.iter().any(|m| m.event["event"] == "device_status" && m.event["data"]["status"] == "online"));
    // Counted by the outlet and shown by the CLI.
    assert_eq!(server.wait_metric(r#"nbhub_outlet_lag_events{outlet="nats"}"#, |v| v == 0.0), 0.0);
    assert!(server.metric(r#"nbhub_outlet_events_acknowledged_total{outlet="nats"}"#) >= 10.0);
    let shown: Value = serde_json::from_str(&server.cli(&["outlets"])).unwrap();
    let outlet = &shown["outlets"][0];
    assert_eq!((outlet["name"].as_str(), outlet["connected"].as_bool()), (Some("nats"), Some(true)), "{shown}");
    assert_eq!(outlet["lag_events"], 0, "{shown}");
    assert!(outlet["target"].as_str().unwrap().contains(&nats.port.to_string()), "{shown}");
    let _ = pk;
}

#[test]
fn a_command_over_nats_reaches_a_sleeping_device_and_its_states_come_back_as_events() {
    let nats = Broker::nats();
    let env = [("NBHUB_NATS_URL", nats.url()), ("NBHUB_ADMIN_CLOCK_CONTROL", "true".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_with(&env);
    let client = NatsClient::connect(&nats.url());
    let node = "861234567890202";
    let (pk, dn) = server.huawei_device(node, streamed());
    let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
    dev.bind();
    server.wait_device(&pk, &dn, |d| d["status"] == "online");
    server.advance_clock(Duration::from_millis(1500)); // past its awake window: asleep

    let subject = format!("nbhub.local.{pk}.{dn}.command");
    let (status, answer) = client.request(&subject, &json!({"payload_base64": STANDARD.encode(b"valve shut")}));
    assert_eq!((status, answer["status"].as_str()), (201, Some("PENDING")), "{answer}");
    let id = answer["command_id"].as_str().unwrap().to_string();
    assert!(dev.command(Duration::from_millis(400)).is_none(), "not sent to a sleeping device");
    dev.report(b"awake");
    let cmd = dev.command(Duration::from_secs(5)).expect("the command on the next report");
    assert_eq!(cmd.payload, b"valve shut");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(&id, "DELIVERED");
    let states = |s: &[Streamed]| -> Vec<String> {
        s.iter()
            .filter(|m| m.event["event"] == "command_status" && m.event["data"]["command_id"] == id.as_str())
            .map(|m| m.event["data"]["status"].as_str().unwrap().to_string())
            .collect()
    };
    let stream =
        eventually(|| client.stream("NBHUB"), |s| states(s).contains(&"DELIVERED".into()), |s| format!("{s:#?}"));
    assert_eq!(states(&stream).last().map(String::as_str), Some("DELIVERED"), "{:?}", states(&stream));
    assert!(states(&stream).contains(&"SENT".to_string()));

    // Errors are the admin API's, with its status.
    let (status, e) = client.request(&format!("nbhub.local.{pk}.nobody.command"), &json!({"payload_base64": "eA=="}));
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("not_found")), "{e}");
    let (status, e) = client.request(&subject, &json!({"payload": "x"}));
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("payload"), "{e}");
    // Nothing was queued by either.
    let listed = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/commands")).unwrap();
    assert_eq!(listed["commands"].as_array().unwrap().len(), 1, "{listed}");
}

#[test]
fn two_instances_publish_into_one_stream() {
    let nats = Broker::nats();
    let start =
        |name: &str| Server::start_with(&[("NBHUB_NATS_URL", nats.url().as_str()), ("NBHUB_CLUSTER_NAME", name)]);
    let (east, west) = (start("east"), start("west"));
    let client = NatsClient::connect(&nats.url());
    let mut names = Vec::new();
    for (server, node) in [(&east, "861234567890203"), (&west, "861234567890204")] {
        let (_, dn) = server.huawei_device(node, streamed());
        let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
        dev.bind();
        for r in reports(0..5) {
            dev.report_confirmed(&r);
        }
        names.push(dn);
    }
    let stream = eventually(
        || client.stream("NBHUB"),
        |s| names.iter().all(|dn| uplinks(s, dn).len() >= 5),
        |s| format!("{s:#?}"),
    );
    for (dn, instance) in names.iter().zip(["east", "west"]) {
        assert_eq!(uplinks(&stream, dn), reports(0..5), "{instance}");
        let m = stream.iter().find(|m| &m.event["device_name"] == dn).unwrap();
        assert!(m.subject.starts_with(&format!("nbhub.{instance}.")) && m.msg_id.starts_with(&format!("{instance}:")));
    }
    // Both instances count events from 1: the message ids still differ.
    let ids: HashSet<&str> = stream.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), stream.len());
}

/// A subscriber on `topic` at QoS 1 with a session the broker keeps (rumqttc, as an application
/// would use it): every (topic, payload) it received, across broker restarts.
struct Subscriber {
    lines: Arc<Mutex<Vec<(String, String)>>>,
    subscribed: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl Subscriber {
    fn start(port: u16, topic: &str) -> Subscriber {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut options = rumqttc::MqttOptions::new(format!("test-sub-{port}"), "127.0.0.1", port);
        options.set_clean_session(false).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let (sink, topic, suback) = (lines.clone(), topic.to_string(), subscribed.clone());
        runtime.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        client.subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce).await.unwrap();
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => suback.store(true, Ordering::Relaxed),
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        sink.lock().unwrap().push((p.topic.clone(), payload));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let s = Subscriber { lines, subscribed, _runtime: runtime };
        // Subscribed before anything is published.
        eventually(|| s.subscribed.load(Ordering::Relaxed), |&b| b, |_| "no SUBACK".into());
        s
    }

    fn events(&self) -> Vec<(String, Value)> {
        let lines = self.lines.lock().unwrap().clone();
        lines.into_iter().filter_map(|(t, p)| Some((t, serde_json::from_str(&p).ok()?))).collect()
    }
}

fn mosquitto_pub(port: u16, topic: &str, body: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", body])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The first occurrence of each event, in order (QoS 1 may deliver one again after a crash).
fn first_of_each(events: &[(String, Value)]) -> Vec<(String, Value)> {
    let mut seen = HashSet::new();
    events.iter().filter(|(_, e)| seen.insert(e["event_id"].as_str().unwrap_or("").to_string())).cloned().collect()
}

#[test]
fn events_reach_mqtt_across_kill_9_and_a_broker_restart_and_commands_come_in() {
    let mut broker = Broker::mosquitto();
    let sub = Subscriber::start(broker.port, "nbhub/#");
    let env = [("NBHUB_MQTT_URL", broker.url()), ("NBHUB_ADMIN_CLOCK_CONTROL", "true".to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut server = Server::start_with(&env);
    server.wait_metric(r#"nbhub_outlet_connected{outlet="mqtt"}"#, |v| v == 1.0);
    let node = "861234567890205";
    let (pk, dn) = server.huawei_device(node, streamed());
    let mut dev = HuaweiDevice::new(server.endpoints.coap, node);
    dev.bind();
    let sent = through_a_crash_and_an_outage(&mut server, &mut dev, &mut broker, "mqtt");
    let uplinks_of = |events: &[(String, Value)]| -> Vec<Vec<u8>> {
        first_of_each(events).iter().filter(|(_, e)| e["event"] == "uplink").map(|(_, e)| payload(e)).collect()
    };
    let events = eventually(|| sub.events(), |e| uplinks_of(e).len() >= sent.len(), |e| format!("{e:#?}"));
    assert_eq!(uplinks_of(&events), sent, "every acknowledged uplink, in order");
    for (topic, e) in &events {
        assert_eq!(topic, &format!("nbhub/local/{pk}/{dn}/{}", e["event"].as_str().unwrap()));
    }

    // A command from the command topic reaches the sleeping device on its next report; its
    // answer comes back on .../command/answer and its states as events.
    server.advance_clock(Duration::from_millis(1500));
    let base = format!("nbhub/local/{pk}/{dn}/command");
    mosquitto_pub(broker.port, &base, &json!({"payload_base64": STANDARD.encode(b"open")}).to_string());
    let answered = |e: &[(String, Value)]| e.iter().find(|(t, _)| t == &format!("{base}/answer")).cloned();
    let events = eventually(|| sub.events(), |e| answered(e).is_some(), |e| format!("{e:#?}"));
    let (_, answer) = answered(&events).unwrap();
    assert_eq!(answer["status"], "PENDING", "{answer}");
    let id = answer["command_id"].as_str().unwrap().to_string();
    dev.report(b"awake");
    let cmd = dev.command(Duration::from_secs(5)).expect("the command on the next report");
    assert_eq!(cmd.payload, b"open");
    dev.answer(&cmd, Code::CHANGED, b"");
    server.wait_command(&id, "DELIVERED");
    let delivered = |e: &Vec<(String, Value)>| {
        e.iter().any(|(_, e)| {
            e["event"] == "command_status"
                && e["data"]["command_id"] == id.as_str()
                && e["data"]["status"] == "DELIVERED"
        })
    };
    eventually(|| sub.events(), delivered, |e| format!("{e:#?}"));
    // A bad one is answered with the admin API's error and queues nothing.
    mosquitto_pub(broker.port, &base, "not json");
    let errors =
        |e: &[(String, Value)]| e.iter().filter(|(t, e)| t.ends_with("/answer") && e["error"].is_object()).count();
    eventually(|| sub.events(), |e| errors(e) == 1, |e| format!("{e:#?}"));
    let listed = server.admin().get(&format!("/api/v1/products/{pk}/devices/{dn}/commands")).unwrap();
    assert_eq!(listed["commands"].as_array().unwrap().len(), 1);
}
