//! A headless Chromium driven over W3C WebDriver (Debian's `chromium` and `chromium-driver`),
//! for the console's tests: just the commands they use, over plain HTTP to `chromedriver`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const WAIT: Duration = Duration::from_secs(20);

pub struct Browser {
    driver: Child,
    agent: ureq::Agent,
    /// `http://127.0.0.1:<port>/session/<id>`.
    session: String,
    /// Where screenshots go (kept after the run for a reviewer).
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

fn which(names: &[&str]) -> String {
    for n in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = format!("{dir}/{n}");
            if std::path::Path::new(&p).exists() {
                return p;
            }
        }
    }
    panic!("none of {names:?} is installed (scripts/install-deps installs chromium and chromium-driver)")
}

impl Browser {
    /// A fresh headless browser at a laptop's window size; screenshots go to
    /// `target/console-screenshots/<test>/`.
    pub fn start(test: &str) -> Browser {
        let driver_bin = which(&["chromedriver"]);
        let chromium = which(&["chromium", "chromium-browser"]);
        let port = super::reserve_port().port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while agent.get(&format!("{base}/status")).call().is_err() {
            assert!(started.elapsed() < WAIT, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1366,900", "--no-first-run", "--disable-extensions",
                         format!("--user-data-dir={}", profile.path().display())],
            },
        }}});
        let mut r = agent.post(&format!("{base}/session")).send_json(&caps).expect("new session");
        let v: Value = r.body_mut().read_json().expect("session answer");
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots").join(test);
        std::fs::create_dir_all(&shots).unwrap();
        Browser { driver, agent, session: format!("{base}/session/{id}"), shots, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let mut r = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self.agent.post(&url).send_json(body.unwrap_or_else(|| json!({}))),
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
        if let Some(err) = v["value"]["error"].as_str() {
            panic!("{method} {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its value.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// The page's state of `css`: its text, or `None` while no element matches.
    pub fn text(&self, css: &str) -> Option<String> {
        self.eval(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
            json!([css]),
        )
        .as_str()
        .map(str::to_string)
    }

    /// Waits until `css` matches an element whose text passes `ok`; its text.
    pub fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let t = self.text(css);
            if let Some(t) = t.as_deref().filter(|t| ok(t)) {
                return t.to_string();
            }
            if started.elapsed() > WAIT {
                self.screenshot("timeout");
                panic!("{css} never showed what was awaited; it shows {t:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_for(&self, css: &str) -> String {
        self.wait_text(css, |_| true)
    }

    fn element(&self, css: &str) -> Value {
        self.wait_for(css);
        let e = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        assert!(e[ELEMENT].is_string(), "no element reference for {css}: {e}");
        e[ELEMENT].clone()
    }

    /// Clicks `css` as a user would (the browser checks it is visible and enabled).
    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{}/click", id.as_str().unwrap()), None);
    }

    /// Types `text` into the field `css`, after clearing it.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        let id = id.as_str().unwrap();
        self.call("POST", &format!("/element/{id}/clear"), None);
        self.call("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    /// Accepts the `confirm()` the page shows, once it shows one.
    pub fn accept_dialog(&self) {
        let started = Instant::now();
        loop {
            let url = format!("{}/alert/accept", self.session);
            let mut r = self.agent.post(&url).send_json(json!({})).expect("accept the dialog");
            let v: Value = r.body_mut().read_json().unwrap_or(Value::Null);
            if v["value"]["error"].is_null() {
                return;
            }
            assert!(started.elapsed() < WAIT, "no dialog to accept: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Chooses the file at `path` in the file input `css`.
    pub fn attach(&self, css: &str, path: &std::path::Path) {
        let id = self.element(css);
        let text = path.to_str().unwrap();
        self.call("POST", &format!("/element/{}/value", id.as_str().unwrap()), Some(json!({"text": text})));
    }

    /// Picks `value` in the `<select>` `css`.
    pub fn select(&self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]"));
    }

    /// Writes the whole page as `<name>.png`, beyond the window too (Chromium's DevTools
    /// command, which chromedriver passes on).
    pub fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let size = self.eval(
            // From the top, or the sticky header is drawn where the page was scrolled to.
            "window.scrollTo(0, 0); const d = document.documentElement; \
             return [d.scrollWidth, Math.min(d.scrollHeight, 6000)]",
            json!([]),
        );
        let clip = json!({"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1});
        let params = json!({"format": "png", "captureBeyondViewport": true, "clip": clip});
        let shot =
            self.call("POST", "/goog/cdp/execute", Some(json!({"cmd": "Page.captureScreenshot", "params": params})));
        let bytes = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.agent.delete(&self.session).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
