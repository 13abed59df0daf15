//! The OpenAPI document of the HTTP API, generated from the handlers' `#[utoipa::path]`
//! annotations and the request/response types, served at `/openapi.json`.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, error, tracker, user};
use crate::http as ops;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetgate HTTP API",
        description = "Navixy-style JSON API of the fleetgate gateway. Every call takes its \
parameters as a JSON body, form fields or query parameters (user and tracker calls accept GET \
too; operator calls are POST only). Success is `{\"success\": true, …}`; failure is \
`{\"success\": false, \"status\": {\"code\", \"description\"}}` with Navixy's error codes and \
HTTP statuses. User and tracker calls take the session `hash` (from `user/auth`) as a parameter \
or as `Authorization: NVX <hash>`; operator calls take `Authorization: Bearer <operator key>`. \
Live updates are on the WebSocket at `/v2/event/subscription` (see docs/PROTOCOL.md)."
    ),
    paths(
        user::auth,
        user::logout,
        user::get_info,
        tracker::list,
        tracker::get_state,
        tracker::get_states,
        admin::tracker_block,
        admin::tracker_unblock,
        admin::tracker_remove,
        admin::session_revoke,
        admin::user_block,
        admin::user_unblock,
        admin::user_create,
        admin::user_grant,
        admin::user_revoke_grant,
        admin::user_api_key,
        admin::user_api_keys,
        ops::health,
        ops::ready,
        ops::metrics,
    ),
    components(schemas(error::ErrorBody, error::ErrorStatus)),
    modifiers(&OperatorKey),
    tags(
        (name = "user", description = "Sessions: log in, log out, who am I"),
        (name = "tracker", description = "Trackers and their current states"),
        (name = "admin", description = "Operator actions (operator API key required)"),
        (name = "operations", description = "Liveness, readiness and metrics for load balancers and monitoring"),
    )
)]
pub struct ApiDoc;

/// Declares the `operator_key` bearer scheme used by the admin paths.
struct OperatorKey;

impl Modify for OperatorKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description =
            Some("An operator key from `fleetgate api-key create` (`fgk_…`)".into());
        components.add_security_scheme("operator_key", SecurityScheme::Http(scheme));
    }
}

/// The document as JSON, built once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into()))
}

/// `GET /openapi.json`
pub async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(json())
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_lists_every_endpoint() {
        let doc: serde_json::Value = serde_json::from_str(super::json()).unwrap();
        for path in [
            "/v2/user/auth",
            "/v2/tracker/get_states",
            "/v2/admin/user/revoke_grant",
            "/v2/admin/user/api_key",
            "/health",
            "/ready",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["components"]["securitySchemes"]["operator_key"].is_object());
    }
}
