//! The native API's OpenAPI document tells the truth: every operation lists the errors it can
//! answer with the error body, ids are UUIDs, enumerations list their values, and the limits
//! are the application layer's. `scripts/fuzz-openapi` checks the same document against the
//! running server; this test keeps the document from regressing between fuzzing runs.

mod common;

use drover_api::ApiDoc;
use reqwest::Method;
use serde_json::{Value, json};
use utoipa::OpenApi;

fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap()
}

/// The schema of a property of a component, `$ref`s of the property itself followed.
fn property<'a>(doc: &'a Value, schema: &str, name: &str) -> &'a Value {
    let p = &doc["components"]["schemas"][schema]["properties"][name];
    assert!(p.is_object(), "{schema}.{name} is not in the document");
    p
}

fn enum_of(schema: &Value) -> Vec<String> {
    let values = schema["enum"].as_array().or_else(|| schema["items"]["enum"].as_array());
    values
        .unwrap_or_else(|| panic!("no enum in {schema}"))
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

fn strings<T: serde::Serialize>(values: impl IntoIterator<Item = T>) -> Vec<String> {
    values.into_iter().map(|v| serde_json::to_value(v).unwrap().as_str().unwrap().to_string()).collect()
}

#[test]
fn every_operation_documents_its_errors_ids_and_enumerations() {
    let problems = drover_api::openapi::problems(&document(), &["/v1/token"], &[]);
    assert!(problems.is_empty(), "the document breaks its rules:\n{}", problems.join("\n"));
}

#[test]
fn the_rules_catch_a_document_that_breaks_them() {
    // The checker itself must fail on a document that lies, or the test above proves nothing.
    let mut doc = document();
    let op = &mut doc["paths"]["/v1/vms/{id}"]["get"];
    op["responses"].as_object_mut().unwrap().remove("401");
    op["responses"]["404"]["content"] = json!({});
    doc["components"]["schemas"]["VmView"]["properties"]["host_id"] = json!({"type": "string"});
    doc["components"]["schemas"]["VmView"]["properties"]["power_state"] = json!({"type": "string"});
    let problems = drover_api::openapi::problems(&doc, &["/v1/token"], &[]);
    for expected in [
        "GET /v1/vms/{id}: no 401 response",
        "GET /v1/vms/{id}: 404 has no ErrorBody schema",
        "schema VmView: host_id is not format uuid",
        "schema VmView: power_state does not list its values",
    ] {
        assert!(problems.iter().any(|p| p == expected), "{expected:?} not found in {problems:#?}");
    }
}

#[test]
fn enumerations_are_the_domains() {
    use drover_types as d;
    let doc = document();
    assert_eq!(enum_of(property(&doc, "UserView", "role")), strings(d::Role::ALL));
    assert_eq!(enum_of(property(&doc, "CreateUser", "role")), strings(d::Role::ALL));
    assert_eq!(enum_of(property(&doc, "SessionView", "kind")), strings(d::SessionKind::ALL));
    assert_eq!(enum_of(property(&doc, "PlanView", "state")), strings(d::PlanState::ALL));
    let interrupted = property(&doc, "PlanView", "interrupted_state");
    assert!(interrupted["enum"].as_array().unwrap().contains(&Value::Null), "null when not halted: {interrupted}");
    assert_eq!(enum_of(property(&doc, "SiteView", "kind")), ["Production", "DisasterRecovery"]);
    // Every code the error mapper gives is listed.
    let codes = enum_of(property(&doc, "ErrorBody", "error"));
    for e in [d::Error::not_found("vm", "x"), d::Error::AlreadyExists("x".into()), d::Error::internal("x")] {
        assert!(codes.contains(&drover_api::error::status_of(&e).1.to_string()), "{e:?} in {codes:?}");
    }
    // The plan actions the path takes.
    let action = doc["paths"]["/v1/plans/{id}/{action}"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "action")
        .unwrap()["schema"]
        .clone();
    assert!(enum_of(&action).contains(&"commit-failback".to_string()), "{action}");
}

#[test]
fn limits_are_the_application_layers() {
    use drover_types as d;
    let doc = document();
    let vm = |name: &str| property(&doc, "CreateVm", name).clone();
    assert_eq!((vm("vcpus")["minimum"].clone(), vm("vcpus")["maximum"].clone()), (json!(1), json!(d::VM_MAX_VCPUS)));
    assert_eq!(
        (vm("memory_mib")["minimum"].clone(), vm("memory_mib")["maximum"].clone()),
        (json!(d::VM_MIN_MEMORY_MIB), json!(d::VM_MAX_MEMORY_MIB))
    );
    assert_eq!(property(&doc, "DiskBody", "size_bytes")["maximum"], json!(d::DISK_MAX_BYTES));
    let retention = property(&doc, "CreateReplicationJob", "retention_points");
    assert_eq!((&retention["minimum"], &retention["maximum"]), (&json!(1), &json!(d::MAX_RETENTION_POINTS)));
    let name = property(&doc, "PlanBody", "name");
    assert_eq!((&name["minLength"], &name["maxLength"]), (&json!(1), &json!(128)), "{name}");
    assert_eq!(property(&doc, "PlanGroupBody", "delay_secs")["maximum"], json!(d::PLAN_MAX_GROUP_DELAY_SECS));
    let schedule = doc["components"]["schemas"]["ScheduleBody"].to_string();
    assert!(schedule.contains(&format!("\"minimum\":{}", d::MIN_INTERVAL_SECS)), "{schedule}");
    let steps = doc["components"]["schemas"]["StepKindBody"].to_string();
    assert!(steps.contains(&format!("\"maximum\":{}", d::PLAN_MAX_STEP_TIMEOUT_SECS)), "{steps}");
}

/// What the name and tag rules of the document say is what the server does: a name that
/// breaks them is a 400 (the fuzzer's invalid cases rely on it), one that keeps them is not.
#[tokio::test]
async fn the_served_document_is_the_one_tested_and_its_name_rules_hold() {
    let server = common::Server::simulated().await;
    let t = server.admin().await;
    let served = server.ok(&t, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(served, document());
    for (name, ok) in [
        ("a", true),
        (" padded ", true),
        (&"x".repeat(128), true),
        (&"x".repeat(129), false),
        ("   ", false),
        ("tab\tinside", false),
        ("\u{85}next line", false),
    ] {
        let (status, body) =
            server.call(Some(&t), Method::POST, "/v1/sites", Some(json!({"name": name, "kind": "Production"}))).await;
        assert_eq!(status.is_success(), ok, "{name:?}: {status} {body}");
    }
    server.stop().await;
}

/// A plan action's body is optional and nullable in the document (the fuzzer sent `null`, and
/// the server refused it with a 400): none and `null` both mean the defaults.
#[tokio::test]
async fn a_plan_action_takes_no_body_or_null() {
    let doc = document();
    let body = &doc["paths"]["/v1/plans/{id}/{action}"]["post"]["requestBody"];
    assert_ne!(body["required"], true, "{body}");
    let server = common::Server::simulated().await;
    let t = server.admin().await;
    let plan = server.ok(&t, Method::POST, "/v1/plans", Some(json!({"name": "p"}))).await;
    // `reset` reads the body before it acts; whatever it answers, null must answer the same as
    // no body, and not the 400 of a bad body.
    let path = format!("/v1/plans/{}/reset", plan["id"].as_str().unwrap());
    let (without, v) = server.call(Some(&t), Method::POST, &path, None).await;
    assert_ne!(without.as_u16(), 400, "{v}");
    let (with_null, v) = server.call(Some(&t), Method::POST, &path, Some(Value::Null)).await;
    assert_eq!(with_null, without, "{v}");
    let (status, v) = server.call(Some(&t), Method::POST, &path, Some(json!({"option": "Sideways"}))).await;
    assert_eq!(status.as_u16(), 400, "a body that is there is still checked: {v}");
    server.stop().await;
}
