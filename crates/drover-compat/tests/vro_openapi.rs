//! The Recovery Orchestrator dialect's OpenAPI document tells the truth: every operation lists
//! the errors it can answer with the dialect's error body, ids are UUIDs and enumerations list
//! their values (the same rules as the native API's document, `drover_api::openapi::problems`).
//! `scripts/fuzz-openapi` checks the document against the running server.

use drover_compat::vro::VroApiDoc;
use drover_compat::vro::views::{role_name, state_id};
use drover_types::{PlanState, Role};
use serde_json::{Value, json};
use utoipa::OpenApi;

fn document() -> Value {
    serde_json::to_value(VroApiDoc::openapi()).unwrap()
}

fn enum_of(schema: &Value) -> Vec<&str> {
    let values = schema["enum"].as_array().or_else(|| schema["items"]["enum"].as_array());
    values.unwrap_or_else(|| panic!("no enum in {schema}")).iter().filter_map(Value::as_str).collect()
}

/// `resourceId` names what an error is about, which may be a path segment that is no UUID.
const FREE_TEXT_IDS: [&str; 1] = ["resourceId"];

#[test]
fn every_operation_documents_its_errors_ids_and_enumerations() {
    let problems = drover_api::openapi::problems(&document(), &["/api/token"], &FREE_TEXT_IDS);
    assert!(problems.is_empty(), "the document breaks its rules:\n{}", problems.join("\n"));
}

#[test]
fn the_rules_catch_a_document_that_breaks_them() {
    let mut doc = document();
    let op = &mut doc["paths"]["/api/v3/Plans/{planId}/Failover"]["post"];
    op["responses"].as_object_mut().unwrap().remove("403");
    doc["components"]["schemas"]["RecoveryPlanInfo"]["properties"]["mode"] = json!({"type": "string"});
    let problems = drover_api::openapi::problems(&doc, &["/api/token"], &FREE_TEXT_IDS);
    for expected in [
        "POST /api/v3/Plans/{planId}/Failover: no 403 response",
        "schema RecoveryPlanInfo: mode does not list its values",
    ] {
        assert!(problems.iter().any(|p| p == expected), "{expected:?} not found in {problems:#?}");
    }
}

#[test]
fn enumerations_are_the_dialects() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    let states: Vec<&str> = PlanState::ALL.map(state_id).to_vec();
    assert_eq!(enum_of(&schemas["RecoveryPlanInfo"]["properties"]["state"]), states);
    assert_eq!(enum_of(&schemas["PlanRuntimeDetails"]["properties"]["lastStableState"]), states);
    assert_eq!(enum_of(&schemas["PlanRuntimeDetails"]["properties"]["roles"]), Role::ALL.map(role_name).to_vec());
    assert_eq!(enum_of(&schemas["RecoveryPlanInfo"]["properties"]["mode"]), ["ENABLED", "DISABLED", "IN-USE"]);
    assert_eq!(
        enum_of(&schemas["StepParameter"]["properties"]["name"]),
        ["Arguments", "Path", "Port", "TimeoutSeconds"]
    );
    assert_eq!(enum_of(&schemas["ErrorCode"]).len(), 11);
    assert_eq!(enum_of(&schemas["ScopeInfo"]["properties"]["state"]), ["Active"]);
    assert_eq!(enum_of(&schemas["ReadinessCheckStarted"]["properties"]["state"]), ["Checking"]);
}
