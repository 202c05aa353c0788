//! The OpenAPI 3.1 document (generated from the handlers' annotations, so it cannot drift from
//! the routes) and Swagger UI served from the binary, with no internet access needed.

use axum::Router;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};
use utoipa_swagger_ui::SwaggerUi;

use super::{
    AppState,
    error::{FieldError, Problem},
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskd",
        description = "Task management API: users, categories and tasks. Errors are RFC 9457 \
                       problem+json. Authenticate with `Authorization: Bearer <accessToken>` from \
                       `/api/v1/auth/login` or `/api/v1/auth/register`."
    ),
    modifiers(&BearerAuth),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "auth", description = "Registration, login and tokens"),
        (name = "users", description = "The caller, and user management for admins"),
        (name = "categories", description = "Per-user task categories"),
        (name = "tasks", description = "Tasks, with filtering, search, sorting and pagination"),
        (name = "admin", description = "Deployment operations (admins)"),
        (name = "health", description = "Probes and metrics"),
        (name = "cors", description = "Preflights of cross-origin requests (`worker.cors`)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The document's fixed parts; routes add their paths.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

/// Swagger UI at `/docs`, reading the document served at `/openapi.json`.
pub fn docs(spec: utoipa::openapi::OpenApi) -> Router<AppState> {
    SwaggerUi::new("/docs").url("/openapi.json", spec).into()
}

/// Documents cross-origin use (`[worker.cors]`, see [`super::cors`]): a paragraph of the
/// document's description always, and with origins allowed, the preflight (`OPTIONS`) of every
/// `/api/v1` path with the headers it answers.
pub fn document_cors(doc: &mut utoipa::openapi::OpenApi, cors: &crate::config::CorsConfig) {
    use utoipa::openapi::{
        Required,
        header::HeaderBuilder,
        path::{OperationBuilder, ParameterBuilder, ParameterIn},
        response::ResponseBuilder,
        schema::{ObjectBuilder, Type},
    };
    let exposed: Vec<String> = super::cors::EXPOSED_HEADERS
        .iter()
        .map(|h| format!("`{h}`"))
        .collect();
    let note = format!(
        "\n\nBrowser pages of the origins in `worker.cors.allowed_origins` (exact \
         `scheme://host[:port]`; none by default, and then no CORS headers are sent) may call \
         the API: responses carry `Access-Control-Allow-Origin` for them and `Vary: Origin`, \
         credentials are not allowed (send the token in `Authorization`), and pages may read \
         {}. Preflights (`OPTIONS`) are answered without counting against rate limits.",
        exposed.join(", ")
    );
    let description = doc.info.description.get_or_insert_with(String::new);
    description.push_str(&note);
    if cors.allowed_origins.is_empty() {
        return;
    }
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let header = |description: &str| {
        HeaderBuilder::new()
            .schema(text())
            .description(Some(description))
            .build()
    };
    let request_header = |name: &str, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::True)
            .description(Some(description))
            .schema(Some(text()))
            .build()
    };
    let answer = ResponseBuilder::new()
        .description(
            "Preflight answered (no body). `Access-Control-Allow-Origin` is present only for an \
             allowed origin; without it the browser refuses the request.",
        )
        .header(
            "Access-Control-Allow-Origin",
            header("The request's `Origin`, when it is allowed"),
        )
        .header(
            "Access-Control-Allow-Methods",
            header("GET, POST, PATCH, DELETE"),
        )
        .header(
            "Access-Control-Allow-Headers",
            header("authorization, content-type, if-none-match, idempotency-key, x-request-id"),
        )
        .header(
            "Access-Control-Max-Age",
            header("Seconds a browser may reuse this answer (`worker.cors.max_age`)"),
        )
        .header(
            "Vary",
            header("origin, access-control-request-method, access-control-request-headers"),
        )
        .build();
    let preflight = OperationBuilder::new()
        .tag("cors")
        .summary(Some("CORS preflight"))
        .description(Some(
            "Sent by browsers before a cross-origin request; not counted against rate limits.",
        ))
        .parameter(request_header("Origin", "The calling page's origin"))
        .parameter(request_header(
            "Access-Control-Request-Method",
            "The method of the request to come",
        ))
        .response("200", answer)
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        if path.starts_with("/api/v1/") {
            item.options = Some(preflight.clone());
        }
    }
}
