//! A small blocking client for the admin API, used by the CLI helpers and the load generators.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Where the admin API is and how to authenticate to it (command-line flags of the CLI and the
/// load generators).
#[derive(clap::Args, Clone)]
pub struct AdminArgs {
    #[arg(long, env = "NBHUB_ADMIN_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub admin_url: String,
    /// Defaults to the contents of <data dir>/admin-token.
    #[arg(long, env = "NBHUB_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    #[arg(long, env = "NBHUB_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,
}

impl AdminArgs {
    /// A client with the given token, else the one in the data directory.
    pub fn connect(&self) -> Result<AdminClient, String> {
        let token = AdminClient::token_from(self.token.clone(), &self.data_dir).ok_or_else(|| {
            format!(
                "no admin token: pass --token, set NBHUB_ADMIN_TOKEN, or run where {} exists",
                self.data_dir.join(crate::ADMIN_TOKEN_FILE).display()
            )
        })?;
        Ok(AdminClient::new(&self.admin_url, &token))
    }
}

/// A product made for a load run and its devices' (name, secret).
pub struct Fleet {
    pub product_key: String,
    pub devices: Vec<(String, String)>,
}

/// Every device of a 100,000-row import with its secret, or a big product's export.
const MAX_ANSWER_BYTES: u64 = 1 << 30;

pub struct AdminClient {
    agent: ureq::Agent,
    base: String,
    token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {url}: {source}")]
    Transport { url: String, source: ureq::Error },
    #[error("{status} from {method} {path}: {message}")]
    Api { status: u16, method: &'static str, path: String, message: String },
}

impl AdminClient {
    pub fn new(base: &str, token: &str) -> AdminClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        AdminClient { agent: config.into(), base: base.trim_end_matches('/').to_string(), token: token.to_string() }
    }

    /// The token from `explicit`, else from the data directory's `admin-token` file.
    pub fn token_from(explicit: Option<String>, data_dir: &Path) -> Option<String> {
        explicit.filter(|t| !t.is_empty()).or_else(|| {
            std::fs::read_to_string(data_dir.join(crate::ADMIN_TOKEN_FILE)).ok().map(|t| t.trim().to_string())
        })
    }

    /// Creates a product named `name` and `count` devices named `<prefix><i>`.
    pub fn create_fleet(&self, name: &str, prefix: &str, count: usize) -> Result<Fleet, ClientError> {
        let product = self.post("/api/v1/products", &serde_json::json!({"name": name}))?;
        let product_key = product["product_key"].as_str().unwrap_or_default().to_string();
        let devices = (0..count)
            .map(|i| {
                let path = format!("/api/v1/products/{product_key}/devices");
                let d = self.post(&path, &serde_json::json!({"device_name": format!("{prefix}{i}")}))?;
                let field = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                Ok((field("device_name"), field("device_secret")))
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Fleet { product_key, devices })
    }

    /// The answer's body on a 2xx, else the API's error.
    fn send(&self, method: &'static str, path: &str, body: Body<'_>) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("PATCH", b) => self.agent.patch(&url).header("Authorization", &auth).send_json(b.json()),
            ("PUT", b) => self.agent.put(&url).header("Authorization", &auth).send_json(b.json()),
            (_, Body::Bytes(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/octet-stream")
                .send(b),
            (_, b) => self.agent.post(&url).header("Authorization", &auth).send_json(b.json()),
        };
        let mut response = result.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = response.status().as_u16();
        // Room for the largest answer the API gives: an import's or export's file.
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        let message = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
        Err(ClientError::Api { status, method, path: path.to_string(), message })
    }

    /// The answer as JSON (a text that is not JSON, such as a CSV file, as a string).
    fn call(&self, method: &'static str, path: &str, body: Body<'_>) -> Result<Value, ClientError> {
        let text = self.send(method, path, body)?;
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) })
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, Body::None)
    }
    /// GET of a file (an export), as it came.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.send("GET", path, Body::None)
    }
    /// POST of a file (an import), the answer as it came.
    pub fn post_file(&self, path: &str, body: &[u8]) -> Result<String, ClientError> {
        self.send("POST", path, Body::Bytes(body))
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Body::Json(body))
    }
    /// POST with raw bytes as the body (a package upload).
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, ClientError> {
        self.call("POST", path, Body::Bytes(body))
    }
    pub fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("PATCH", path, Body::Json(body))
    }
    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("PUT", path, Body::Json(body))
    }
    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call("DELETE", path, Body::None)
    }

    /// The value of one sample of the server's `/metrics` (e.g.
    /// `nbhub_codec_decoded_total{outcome="ok"}`), 0 if absent or unreadable.
    pub fn metric(&self, sample: &str) -> f64 {
        self.samples(|name| name == sample).sum()
    }

    /// The sum of every sample of metric `name` whatever its labels (e.g. every outcome of
    /// `nbhub_codec_decoded_total`), 0 if it has none.
    pub fn metric_total(&self, name: &str) -> f64 {
        self.samples(|sample| sample == name || sample.strip_prefix(name).is_some_and(|l| l.starts_with('{'))).sum()
    }

    /// The values of the `/metrics` samples whose name and labels `wanted` accepts.
    fn samples(&self, wanted: impl Fn(&str) -> bool) -> impl Iterator<Item = f64> {
        let text = self.get("/metrics").ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let values: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(sample, _)| wanted(sample))
            .filter_map(|(_, v)| v.trim().parse().ok())
            .collect();
        values.into_iter()
    }
}

#[derive(Clone, Copy)]
enum Body<'a> {
    None,
    Json(&'a Value),
    Bytes(&'a [u8]),
}

impl<'a> Body<'a> {
    /// The JSON to send (null without one).
    fn json(self) -> &'a Value {
        static NULL: Value = Value::Null;
        match self {
            Body::Json(v) => v,
            Body::None | Body::Bytes(_) => &NULL,
        }
    }
}
