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
