//! The Recovery Orchestrator dialect.
