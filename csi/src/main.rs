//! zebu-csi (being built).
fn main() {}
