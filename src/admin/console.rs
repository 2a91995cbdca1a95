//! The operator console: static pages embedded in the binary and served on the admin port, so
//! it works offline and is always the version of the server it talks to. The pages hold no
//! secret and need no token; everything they show comes from `/api/v1` with the token the
//! operator types in.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::AdminState;
use super::error::ApiError;

/// The console's files: name, content type, content.
const FILES: [(&str, &str, &str); 13] = [
    ("index.html", "text/html; charset=utf-8", include_str!("console/index.html")),
    ("console.css", "text/css; charset=utf-8", include_str!("console/console.css")),
    ("main.js", JS, include_str!("console/main.js")),
    ("api.js", JS, include_str!("console/api.js")),
    ("dom.js", JS, include_str!("console/dom.js")),
    ("format.js", JS, include_str!("console/format.js")),
    ("chart.js", JS, include_str!("console/chart.js")),
    ("fleet.js", JS, include_str!("console/fleet.js")),
    ("device.js", JS, include_str!("console/device.js")),
    ("trace.js", JS, include_str!("console/trace.js")),
    ("upgrades.js", JS, include_str!("console/upgrades.js")),
    ("distribution.js", JS, include_str!("console/distribution.js")),
    ("favicon.svg", "image/svg+xml", FAVICON),
];

const JS: &str = "text/javascript; charset=utf-8";
const FAVICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="7" fill="#2f7d4f"/></svg>"##;

/// Only the console's own files and the API: no inline script, nothing from elsewhere, no framing.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                      connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(|| async { file("index.html") }))
        .route("/console/{name}", get(|Path(name): Path<String>| async move { file(&name) }))
}

fn file(name: &str) -> Response {
    let Some((_, content_type, body)) = FILES.iter().find(|(n, ..)| *n == name) else {
        return ApiError::not_found(format!("the console has no file {name}")).into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Revalidated each time: after an upgrade the browser takes the new server's pages.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
