//! The Enterprise Manager dialect.
