//! The OpenAPI description (`/api/openapi.json`), generated from the handlers'
//! annotations, and the interactive page (`/api/doc`, Swagger UI served from the
//! binary).

use super::{billing_run, credits, errors, held, history, notifications, ops, projects};
use actix_web::{web, HttpResponse};
use std::collections::BTreeMap;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

/// Every documented endpoint.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "os-credits",
        description = "Per-project credit balances from Prometheus usage. The old service's endpoints keep its shapes (credits as JSON numbers); new endpoints show credits as exact decimal strings."
    ),
    paths(
        super::ping,
        super::health::health,
        credits::metrics,
        credits::costs_per_hour,
        credits::current_credits,
        history::credits_history,
        credits::rules,
        projects::list,
        projects::detail,
        projects::grant,
        projects::adjust,
        held::list,
        held::approve,
        held::reject,
        notifications::set_contacts,
        notifications::get_contacts,
        notifications::list,
        notifications::resend,
        billing_run::run,
        ops::prometheus,
        ops::stats,
        ops::get_logconfig,
        ops::set_logconfig,
        crate::receive::http::write,
    ),
    components(schemas(errors::ErrorBody)),
    modifiers(&ApiKeyScheme)
)]
struct ApiDoc;

/// Declares the `X-API-KEY` header protected endpoints refer to as `api_key`.
struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(super::auth::HEADER))),
        );
    }
}

/// The methods the description lists for a route pattern (`GET, PUT`), for the
/// `Allow` header of a 405.
pub fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static ALLOWED: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    ALLOWED
        .get_or_init(|| {
            ApiDoc::openapi()
                .paths
                .paths
                .into_iter()
                .map(|(path, item)| {
                    let methods: Vec<&str> = [
                        ("GET", item.get.is_some()),
                        ("PUT", item.put.is_some()),
                        ("POST", item.post.is_some()),
                        ("DELETE", item.delete.is_some()),
                        ("PATCH", item.patch.is_some()),
                    ]
                    .into_iter()
                    .filter_map(|(method, listed)| listed.then_some(method))
                    .collect();
                    (path, methods.join(", "))
                })
                .collect()
        })
        .get(pattern)
        .map(String::as_str)
}

/// `/api/openapi.json`, `/api/doc/` and a redirect from `/api/doc`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(SwaggerUi::new("/api/doc/{_:.*}").url("/api/openapi.json", ApiDoc::openapi()))
        .route(
            "/api/doc",
            web::get().to(|| async {
                HttpResponse::PermanentRedirect()
                    .insert_header(("Location", "/api/doc/"))
                    .finish()
            }),
        );
}
