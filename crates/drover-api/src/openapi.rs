//! What the OpenAPI documents (this API's and the Recovery Orchestrator dialect's) say beyond
//! what the handlers' annotations list: the error answers every operation can give, and the
//! schemas of the string rules and domain enums the application layer enforces.
//!
//! The rules here are the application layer's, written as JSON Schema, so that a schema-driven
//! client (or fuzzer) that sends what the document allows is not refused for breaking a rule the
//! document does not show. Patterns are ECMA-262 and Python `re` alike: no `\s`, `\p{..}` or
//! flags, whose meanings differ between the two.

use drover_types as d;
use serde::Serialize;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::{HeaderBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

/// A character that is neither a control character (`char::is_control`: U+0000-U+001F and
/// U+007F-U+009F) nor whitespace (`char::is_whitespace`, what `str::trim` removes).
const VISIBLE: &str = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// What `drover_types::validate_name` accepts: 1 to 128 characters, no control characters, not
/// only whitespace.
pub fn name() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(128))
        .pattern(Some(format!(r"^[^\x00-\x1f\x7f-\x9f]*{VISIBLE}[^\x00-\x1f\x7f-\x9f]*$")))
        .description(Some("1-128 characters, not only whitespace, no control characters."))
        .build()
}

/// A user's name: a [`name`] without `\` (it separates a domain) or `:` (client users are
/// `client:<id>`).
pub fn user_name() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(128))
        .pattern(Some(format!(r"^[^\x00-\x1f\x7f-\x9f\\:]*{VISIBLE}[^\x00-\x1f\x7f-\x9f\\:]*$")))
        .description(Some("1-128 characters, not only whitespace, no control characters, no '\\' or ':'."))
        .build()
}

/// A password: at least 8 characters.
pub fn password() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(8))
        .description(Some("At least 8 characters."))
        .build()
}

/// Text that is not empty or only whitespace (a host's address, a script's path).
pub fn not_blank() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .pattern(Some(VISIBLE))
        .description(Some("Not empty or only whitespace."))
        .build()
}

/// An absolute path on the host.
pub fn absolute_path() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^/"))
        .description(Some("An absolute path on the host."))
        .build()
}

/// A VM disk's name, which is also its image's file name.
pub fn disk_name() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_-]{1,64}$"))
        .description(Some("1-64 letters, digits, '-' or '_'; the image is `<name>.qcow2`."))
        .build()
}

/// A disk's size in bytes: up to `drover_types::DISK_MAX_BYTES` (0 only when importing).
pub fn disk_size() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64)))
        .minimum(Some(0))
        .maximum(Some(d::DISK_MAX_BYTES as i64))
        .description(Some("Bytes, 1 to 64 TiB; ignored (and may be 0) when importing."))
        .build()
}

/// A MAC address, `aa:bb:cc:dd:ee:ff`.
pub fn mac() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"))
        .description(Some("aa:bb:cc:dd:ee:ff"))
        .build()
}

/// A VM tag as `Tag::from_str` reads it: `category:name`, each side not blank, no `:` in the
/// category.
pub fn tag() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(format!(r"^[^:]*{VISIBLE}[^:]*:[\s\S]*{VISIBLE}[\s\S]*$")))
        .description(Some("`category:name`; neither side blank, no ':' in the category."))
        .build()
}

/// A VM's tags: each a [`tag`].
pub fn tags() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new().items(tag()).build()
}

/// Ids, at least one, each once.
pub fn unique_ids() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Uuid))),
        )
        .min_items(Some(1))
        .unique_items(true)
        .build()
}

/// A string schema whose values are `values`, as serde writes them.
pub fn string_enum<T: Serialize>(values: impl IntoIterator<Item = T>) -> Object {
    let values: Vec<serde_json::Value> =
        values.into_iter().map(|v| serde_json::to_value(v).expect("an enum serialises")).collect();
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(values)).build()
}

/// Defines a function returning the string enum schema of a domain enum without data, listing
/// every variant. The `match` makes a variant added to the domain a compile error here until it
/// is listed, so the document cannot fall behind the domain.
macro_rules! domain_enum {
    ($(#[$doc:meta])* $fn:ident: $ty:ty => [$($v:ident),+ $(,)?]) => {
        $(#[$doc])*
        pub fn $fn() -> Object {
            type E = $ty;
            fn _every_variant_is_listed(e: E) {
                match e {
                    $(E::$v)|+ => {}
                }
            }
            string_enum([$(E::$v),+])
        }
    };
}

/// The `error` codes of this API's error body: what `error::status_of` gives each domain error,
/// and the router's own answer to a method a path does not take.
pub fn error_code() -> Object {
    let samples = [
        d::Error::not_found("object", "id"),
        d::Error::AlreadyExists(String::new()),
        d::Error::invalid(""),
        d::Error::conflict(""),
        d::Error::Unauthorized(String::new()),
        d::Error::Forbidden(String::new()),
        d::Error::Unavailable(String::new()),
        d::Error::TooManyRequests { message: String::new(), retry_after_secs: 1 },
        d::Error::internal(""),
    ];
    // Every variant is above: a new one fails to compile here until it is listed.
    for e in &samples {
        match e {
            d::Error::NotFound { .. }
            | d::Error::AlreadyExists(_)
            | d::Error::InvalidRequest(_)
            | d::Error::Conflict(_)
            | d::Error::Unauthorized(_)
            | d::Error::Forbidden(_)
            | d::Error::Unavailable(_)
            | d::Error::TooManyRequests { .. }
            | d::Error::Internal(_) => {}
        }
    }
    let codes = samples.iter().map(|e| crate::error::status_of(e).1);
    string_enum(codes.chain(["method_not_allowed"]))
}

/// A role, as this API writes it.
pub fn role() -> Object {
    string_enum(d::Role::ALL)
}

/// A session kind.
pub fn session_kind() -> Object {
    string_enum(d::SessionKind::ALL)
}

/// A plan state's API identifier.
pub fn plan_state() -> Object {
    string_enum(d::PlanState::ALL)
}

/// A plan state's API identifier, or null.
pub fn plan_state_or_null() -> Object {
    or_null(plan_state())
}

/// `schema` (of one type, maybe an enum) that may also be null: what an `Option` field takes and
/// gives.
pub fn or_null(mut schema: Object) -> Object {
    if let utoipa::openapi::schema::SchemaType::Type(t) = schema.schema_type {
        schema.schema_type = utoipa::openapi::schema::SchemaType::from_iter([t, Type::Null]);
    }
    if let Some(values) = &mut schema.enum_values {
        values.push(serde_json::Value::Null);
    }
    schema
}

/// Defines `Option` forms of schema functions (`schema_with` replaces the schema utoipa would
/// make, null included).
macro_rules! or_null {
    ($($fn:ident => $base:ident),+ $(,)?) => {
        $(
            #[doc = concat!("[`", stringify!($base), "`], or null.")]
            pub fn $fn() -> Object {
                or_null($base())
            }
        )+
    };
}

or_null!(
    name_or_null => name,
    password_or_null => password,
    role_or_null => role,
    not_blank_or_null => not_blank,
    absolute_path_or_null => absolute_path,
    mac_or_null => mac,
    continue_option_or_null => continue_option,
    consistency_mode_or_null => consistency_mode,
);

/// [`tags`], or null.
pub fn tags_or_null() -> utoipa::openapi::schema::Array {
    let mut tags = tags();
    tags.schema_type = utoipa::openapi::schema::SchemaType::from_iter([Type::Array, Type::Null]);
    tags
}

domain_enum!(site_kind: d::SiteKind => [Production, DisasterRecovery]);
domain_enum!(vm_power_state: d::VmPowerState => [Off, Starting, Running, Stopping, Died]);
domain_enum!(replica_state: d::ReplicaState => [
    Ready, Processing, Failover, FailedFailover, PermanentFailover, ReadyToSwitch, Failback
]);
domain_enum!(restore_point_state: d::RestorePointState => [Published, Retiring]);
domain_enum!(consistency_mode: d::ConsistencyMode => [Require, Try, Off]);
domain_enum!(consistency_kind: d::ConsistencyKind => [Application, Crash]);
domain_enum!(recovery_location_kind: d::RecoveryLocationKind => [Original, Restore]);
domain_enum!(plan_mode: d::PlanMode => [Enabled, Disabled, InUse]);
domain_enum!(session_state: d::SessionState => [Starting, Working, Stopping, Stopped]);
domain_enum!(session_result: d::SessionResult => [None, Success, Warning, Failed]);
domain_enum!(log_level: d::LogLevel => [Info, Warning, Error]);
domain_enum!(continue_option: drover_engine::saga::ContinueOption => [
    RetryFailedStep, ProceedToNextStep, RetryFailedVm, ProceedToNextVm, RetryFailedGroup, ProceedToNextGroup
]);

/// Adds to every operation the error answers that follow from how it is served, with the error
/// body (the component `ErrorBody`, in this API and in the dialects), unless its annotation lists
/// them already:
///
/// - 400 where it takes a parameter or a body: a malformed id, query or body;
/// - 401 where it needs a bearer token: missing, malformed, unknown or expired;
/// - 404 where the path names an object: it does not exist, or belongs to another tenant;
/// - 503 everywhere: the store is busy (a pool time-out, a contended update), try again.
///
/// The rest (403 for a role that is not enough, 409 for a conflict with the state, 404 for an
/// object a body names) depends on what the operation does, and its annotation says it.
#[derive(Debug)]
pub struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, doc: &mut OpenApi) {
        for item in doc.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in operations.into_iter().flatten() {
                self.add_to(op);
            }
        }
    }
}

impl ErrorResponses {
    fn add_to(&self, op: &mut Operation) {
        let params = op.parameters.as_deref().unwrap_or_default();
        let takes_input = !params.is_empty() || op.request_body.is_some();
        let names_object = params.iter().any(|p| p.parameter_in == ParameterIn::Path);
        let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
        let wanted = [
            (takes_input, "400", "The request is malformed or breaks a rule of the schema; nothing changed."),
            (secured, "401", "The bearer token is missing, malformed, unknown or expired."),
            (names_object, "404", "No such object (another tenant's objects are not found either)."),
            (true, "503", "The control plane is busy; try again later (see Retry-After)."),
        ];
        for (applies, status, description) in wanted {
            if !applies || op.responses.responses.contains_key(status) {
                continue;
            }
            let mut response = ResponseBuilder::new().description(description).content(
                "application/json",
                utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            );
            if status == "503" {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
                        .description(Some("Seconds to wait before trying again."))
                        .build(),
                );
            }
            op.responses.responses.insert(status.to_string(), RefOr::T(response.build()));
        }
    }
}

/// The ways `doc` (an OpenAPI document as JSON) breaks the rules this API's and the dialects'
/// documents keep, one line each; empty when it keeps them. Their document tests run it, so a
/// document cannot silently stop telling the truth:
///
/// - every operation answers 401 unless its path is in `unauthenticated`, and 503;
/// - every operation that takes a parameter or a body answers 400;
/// - every operation that changes something (not GET) and needs a token answers 403;
/// - every operation with a path parameter answers 404;
/// - every 4xx and 5xx answer has the `ErrorBody` schema;
/// - every id (a property or parameter named `id`, `…_id`, `…Id`, or an item of `…_ids`) is a
///   string of format `uuid`, except the names in `free_text_ids`;
/// - every property named like an enumeration (`state`, `kind`, `role`, `mode`, `result`, ...)
///   has its values listed.
pub fn problems(doc: &serde_json::Value, unauthenticated: &[&str], free_text_ids: &[&str]) -> Vec<String> {
    use serde_json::Value;
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    for (path, item) in doc["paths"].as_object().unwrap_or(&empty) {
        for (method, op) in item.as_object().unwrap_or(&empty) {
            let at = format!("{} {path}", method.to_uppercase());
            let responses = op["responses"].as_object().unwrap_or(&empty);
            let params = op["parameters"].as_array().map(Vec::as_slice).unwrap_or_default();
            let takes_input = !params.is_empty() || op.get("requestBody").is_some();
            let names_object = params.iter().any(|p| p["in"] == "path");
            let secured = !unauthenticated.contains(&path.as_str());
            let wanted = [
                ("400", takes_input),
                ("401", secured),
                ("403", secured && method != "get"),
                ("404", names_object),
                ("503", true),
            ];
            for (status, needed) in wanted {
                if needed && !responses.contains_key(status) {
                    out.push(format!("{at}: no {status} response"));
                }
            }
            for (status, response) in responses {
                let error = status.starts_with('4') || status.starts_with('5');
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                if error && schema != "#/components/schemas/ErrorBody" {
                    out.push(format!("{at}: {status} has no ErrorBody schema"));
                }
            }
            for p in params {
                let name = p["name"].as_str().unwrap_or_default();
                check_property(&mut out, &format!("{at} parameter"), name, &p["schema"], free_text_ids);
            }
        }
    }
    for (schema_name, schema) in doc["components"]["schemas"].as_object().unwrap_or(&empty) {
        visit_properties(schema, &mut |name, property| {
            check_property(&mut out, &format!("schema {schema_name}"), name, property, free_text_ids);
        });
    }
    return out;

    fn visit_properties(schema: &Value, f: &mut dyn FnMut(&str, &Value)) {
        if let Some(props) = schema["properties"].as_object() {
            for (name, property) in props {
                f(name, property);
                visit_properties(property, f);
            }
        }
        for key in ["oneOf", "anyOf", "allOf"] {
            for variant in schema[key].as_array().into_iter().flatten() {
                visit_properties(variant, f);
            }
        }
        if schema["items"].is_object() {
            visit_properties(&schema["items"], f);
        }
    }
}

/// Names of text properties whose values are a fixed set.
const ENUM_NAMES: [&str; 14] = [
    "state",
    "kind",
    "role",
    "mode",
    "result",
    "level",
    "power_state",
    "grant_type",
    "target_kind",
    "order",
    "option",
    "availability",
    "errorCode",
    "error",
];

fn check_property(out: &mut Vec<String>, at: &str, name: &str, schema: &serde_json::Value, free_text_ids: &[&str]) {
    let is_ref = schema.get("$ref").is_some();
    let id_like = name == "id" || name.ends_with("_id") || name.ends_with("Id");
    if id_like && !is_ref && !free_text_ids.contains(&name) && schema["format"] != "uuid" {
        out.push(format!("{at}: {name} is not format uuid"));
    }
    if (name.ends_with("_ids") || name.ends_with("Ids")) && schema["items"]["format"] != "uuid" {
        out.push(format!("{at}: {name} items are not format uuid"));
    }
    let enumerated = is_ref || schema.get("enum").is_some() || schema["items"].get("enum").is_some();
    let string = |t: &serde_json::Value| t == "string" || t.as_array().is_some_and(|t| t.iter().any(|t| t == "string"));
    let textual = string(&schema["type"]) || string(&schema["items"]["type"]);
    // A number named like an enumeration (a position's `order`) is no enumeration.
    if ENUM_NAMES.contains(&name) && (textual || is_ref) && !enumerated {
        out.push(format!("{at}: {name} does not list its values"));
    }
}
