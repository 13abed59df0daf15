//! The live fleet page: a reference client served by the gateway itself at `/`.
//!
//! Owns the page's routes and its files, which are embedded in the binary (`assets/`, vanilla
//! JavaScript and a canvas, no library), so the page works fully offline: it signs in through
//! `POST /v2/user/auth` (or a pasted session hash), lists trackers with `GET /v2/tracker/list`,
//! and subscribes over `/v2/event/subscription` like any other client. The only server-side
//! setting is the optional tile URL (`[web] tile_url`), handed to the page by
//! `/web/config.json` and allowed by the page's Content-Security-Policy. Everything the page
//! shows comes through the public protocol; this module leaves the protocol to `ws` and `http`.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::http::get_only;
use crate::startup::AppState;

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// A strong validator computed at compile time from the body.
    etag: u64,
}

const fn asset(body: &'static str, content_type: &'static str) -> Asset {
    Asset {
        body,
        content_type,
        etag: fnv1a(body.as_bytes()),
    }
}

/// FNV-1a, 64 bits: enough to tell two builds' files apart.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

const INDEX_HTML: Asset = asset(
    include_str!("assets/index.html"),
    "text/html; charset=utf-8",
);
const APP_JS: Asset = asset(
    include_str!("assets/app.js"),
    "text/javascript; charset=utf-8",
);
const APP_CSS: Asset = asset(include_str!("assets/app.css"), "text/css; charset=utf-8");
const FAVICON: Asset = asset(include_str!("assets/favicon.svg"), "image/svg+xml");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(get_only("/", index))
        .service(get_only("/index.html", index))
        .service(get_only("/web/app.js", app_js))
        .service(get_only("/web/app.css", app_css))
        .service(get_only("/web/favicon.svg", favicon))
        .service(get_only("/web/config.json", page_config));
}

async fn index(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let csp = content_security_policy(&state.settings.web.tile_url);
    let mut res = serve(&req, &INDEX_HTML);
    if let Ok(v) = HeaderValue::from_str(&csp) {
        res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    res.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

async fn app_js(req: HttpRequest) -> HttpResponse {
    serve(&req, &APP_JS)
}

async fn app_css(req: HttpRequest) -> HttpResponse {
    serve(&req, &APP_CSS)
}

async fn favicon(req: HttpRequest) -> HttpResponse {
    serve(&req, &FAVICON)
}

/// What the page needs to know about this gateway's configuration.
async fn page_config(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .json(json!({
            "tile_url": state.settings.web.tile_url,
            "version": env!("CARGO_PKG_VERSION"),
        }))
}

/// Serves an embedded file; revalidated on each load (`no-cache` plus a strong ETag), so a new
/// build's page is picked up at once while an unchanged one costs a 304.
fn serve(req: &HttpRequest, asset: &Asset) -> HttpResponse {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut res = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if fresh {
        return res.finish();
    }
    res.content_type(asset.content_type).body(asset.body)
}

/// The page loads scripts, styles and data from the gateway only; images also from the tile
/// server's origin when a tile URL is configured.
fn content_security_policy(tile_url: &str) -> String {
    let tiles = tile_origin(tile_url)
        .map(|o| format!(" {o}"))
        .unwrap_or_default();
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; \
         img-src 'self' data: blob:{tiles}; connect-src 'self' ws: wss:; object-src 'none'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// `scheme://host[:port]` of an absolute http(s) tile URL, as a CSP source; a `{s}.` subdomain
/// placeholder becomes a `*.` wildcard. `None` for a relative URL (covered by `'self'`) or
/// anything that does not look like a plain origin.
pub(crate) fn tile_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority
        .strip_prefix("{s}.")
        .map_or_else(|| authority.to_string(), |host| format!("*.{host}"));
    let plain = !authority.is_empty()
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '*'));
    plain.then(|| format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_origin_is_a_plain_csp_source() {
        assert_eq!(
            tile_origin("https://tile.example/{z}/{x}/{y}.png").as_deref(),
            Some("https://tile.example")
        );
        assert_eq!(
            tile_origin("http://127.0.0.1:8081/tiles/{z}/{x}/{y}.png").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(
            tile_origin("https://{s}.tile.example/{z}/{x}/{y}.png").as_deref(),
            Some("https://*.tile.example")
        );
        assert_eq!(tile_origin("/tiles/{z}/{x}/{y}.png"), None);
        assert_eq!(tile_origin(""), None);
        assert_eq!(tile_origin("https://evil; script-src *"), None);
        assert_eq!(tile_origin("javascript://x"), None);
    }

    #[test]
    fn policy_allows_only_the_gateway_by_default() {
        let csp = content_security_policy("");
        assert!(csp.contains("img-src 'self' data: blob:;"), "{csp}");
        assert!(!csp.contains("http"), "{csp}");
        let csp = content_security_policy("https://tile.example/{z}/{x}/{y}.png");
        assert!(csp.contains("img-src 'self' data: blob: https://tile.example;"));
    }

    #[test]
    fn assets_are_embedded_and_distinct() {
        assert!(INDEX_HTML.body.contains("/web/app.js"));
        assert!(APP_JS.body.contains("requestAnimationFrame"));
        assert_ne!(INDEX_HTML.etag, APP_JS.etag);
    }
}
