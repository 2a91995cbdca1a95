//! A small blocking client for the admin API, used by the CLI helpers and the load generator.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

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

    fn call(&self, method: &'static str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("PATCH", b) => self.agent.patch(&url).header("Authorization", &auth).send_json(b.unwrap_or(&Value::Null)),
            (_, b) => self.agent.post(&url).header("Authorization", &auth).send_json(b.unwrap_or(&Value::Null)),
        };
        let mut response = result.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let message = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
        Err(ClientError::Api { status, method, path: path.to_string(), message })
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }
    pub fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("PATCH", path, Some(body))
    }
    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call("DELETE", path, None)
    }
}
