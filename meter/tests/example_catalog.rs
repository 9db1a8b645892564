//! The shipped example catalog parses and validates.

#[test]
fn example_catalog_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/catalog.yaml"
    ))
    .unwrap();
    let c = meter::catalog::parse(&text, "examples/catalog.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.plans.len(), 5);
    assert!(c.addons.contains_key("sso"));
}
