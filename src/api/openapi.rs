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

/// The description, with the limits the handlers enforce stated in the schemas.
pub fn description() -> utoipa::openapi::OpenApi {
    let generated = ApiDoc::openapi();
    let Ok(mut doc) = serde_json::to_value(&generated) else {
        return generated;
    };
    tighten(&mut doc);
    serde_json::from_value(doc).unwrap_or(generated)
}

/// A project name as `ProjectName` accepts it: 1–255 bytes (the schema counts
/// characters), not blank, no NUL.
const PROJECT_PATTERN: &str = r"^[^\x00]*[^\x00\s][^\x00]*$";
/// `%Y-%m-%d %H:%M:%S` with years 1–9999 (days up to 28 keep every match a real
/// date), or empty (absent).
const DATE_PATTERN: &str = r"^$|^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]$";
/// A bucket length of at most ten years, or empty.
const STEP_PATTERN: &str =
    r"^$|^([1-9][0-9]{0,7}s?|[1-9][0-9]{0,5}m|[1-9][0-9]{0,3}h|[1-9][0-9]{0,2}d|[1-9][0-9]?w)$";

/// Credits as the write endpoints accept them: a number or decimal string with at
/// most two decimal places (`OS_CREDITS_PRECISION`'s default), below 10^15.
fn credits_schema(negative: bool, zero: bool) -> serde_json::Value {
    let sign = if negative { "-?" } else { "" };
    let digits = if zero {
        r"(0|[1-9][0-9]{0,14})(\.[0-9]{1,2})?"
    } else {
        r"([1-9][0-9]{0,14}(\.[0-9]{1,2})?|0\.(0[1-9]|[1-9][0-9]?))"
    };
    let mut number = serde_json::json!({
        "type": "number", "multipleOf": 0.01, "exclusiveMaximum": 1e15,
    });
    if negative {
        number["exclusiveMinimum"] = serde_json::json!(-1e15);
    } else {
        number["minimum"] = serde_json::json!(0);
    }
    if !zero {
        number["not"] = serde_json::json!({"const": 0});
    }
    serde_json::json!({
        "oneOf": [number, {"type": "string", "pattern": format!("^{sign}{digits}$")}]
    })
}

fn tighten(doc: &mut serde_json::Value) {
    use serde_json::json;
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for operation in item.values_mut() {
                let mut has_query = false;
                let mut has_path = false;
                if let Some(parameters) = operation
                    .get_mut("parameters")
                    .and_then(|p| p.as_array_mut())
                {
                    for parameter in parameters {
                        has_query |= parameter["in"] == "query";
                        has_path |= parameter["in"] == "path";
                        let schema = match parameter["name"].as_str().unwrap_or_default() {
                            "project_name" => {
                                json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": PROJECT_PATTERN})
                            }
                            "start_date" | "end_date" => {
                                json!({"type": "string", "pattern": DATE_PATTERN})
                            }
                            "step" => json!({"type": "string", "pattern": STEP_PATTERN}),
                            "format" => json!({"type": "string", "enum": ["", "json", "csv"]}),
                            "channel" => json!({"type": "string", "enum": ["email", "webhook"]}),
                            // As the old service: any value but empty, `false` or `0` is true.
                            "verbose" => json!({"type": "string"}),
                            _ => continue,
                        };
                        parameter["schema"] = schema;
                    }
                }
                // Malformed or repeated query parameters, and path parameters the
                // handler refuses (a blank project name), are a 400 on every endpoint.
                if has_query || has_path {
                    if let Some(responses) = operation
                        .get_mut("responses")
                        .and_then(|r| r.as_object_mut())
                    {
                        responses.entry("400").or_insert_with(|| json!({
                            "description": "A malformed or repeated query parameter, or a bad path parameter",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
                        }));
                    }
                }
            }
        }
    }
    // Units in use: zero or more, below 10^15, as numbers or decimal strings.
    let costs = &mut doc["paths"]["/api/costs_per_hour"]["post"];
    if costs.is_object() {
        costs["requestBody"]["content"]["application/json"]["schema"] = json!({
            "type": "object",
            "additionalProperties": {"oneOf": [
                {"type": "number", "minimum": 0, "exclusiveMaximum": 1e15},
                {"type": "string", "pattern": r"^(0|[1-9][0-9]{0,14})(\.[0-9]{1,12})?$"}
            ]}
        });
        // The answer is a JSON number.
        let ok = &mut costs["responses"]["200"]["content"];
        if let Some(plain) = ok.get("text/plain").cloned() {
            *ok = json!({"application/json": plain});
        }
    }
    let logconfig =
        &mut doc["paths"]["/logconfig"]["post"]["requestBody"]["content"]["text/plain"]["schema"];
    if logconfig.is_object() {
        logconfig["pattern"] = json!(r"\S");
    }
    let schemas = &mut doc["components"]["schemas"];
    if schemas["GrantBody"].is_object() {
        schemas["GrantBody"]["properties"]["granted_credits"] = credits_schema(false, true);
    }
    if schemas["AdjustmentBody"].is_object() {
        schemas["AdjustmentBody"]["properties"]["credits"] = credits_schema(true, false);
        schemas["AdjustmentBody"]["properties"]["reason"] =
            json!({"type": "string", "pattern": r"^[^\x00]*[^\x00\s][^\x00]*$"});
    }
    if schemas["ContactsBody"].is_object() {
        schemas["ContactsBody"]["properties"]["emails"] = json!({
            "type": "array", "maxItems": 50, "items": {"type": "string", "format": "email"}
        });
    }
}

/// The methods the description lists for a route pattern (`GET, PUT`), for the
/// `Allow` header of a 405.
pub fn allowed_methods(pattern: &str) -> Option<&'static str> {
    static ALLOWED: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    ALLOWED
        .get_or_init(|| {
            description()
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
    cfg.service(SwaggerUi::new("/api/doc/{_:.*}").url("/api/openapi.json", description()))
        .route(
            "/api/doc",
            web::get().to(|| async {
                HttpResponse::PermanentRedirect()
                    .insert_header(("Location", "/api/doc/"))
                    .finish()
            }),
        );
}
