//! Placeholder until the Docker apply benchmark lands with the Docker backend.
fn main() {}
