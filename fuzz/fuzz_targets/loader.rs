//! Fuzzes the descriptor loader with arbitrary file content: it must never panic, hang or grow
//! without bound, and every problem it reports must point inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The YAML layer alone, with and without positions.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = berth::descriptor::yaml::parse(text, false);
        let _ = berth::descriptor::yaml::parse(text, true);
    }
    // The whole loader, on a repo holding this one file.
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::write(dir.path().join("fuzz.yaml"), data).expect("write");
    let options = berth::descriptor::LoadOptions {
        max_file_size: 64 * 1024,
        ..Default::default()
    };
    let loaded = berth::descriptor::load(dir.path(), &options).expect("the folder exists");
    // Lines as YAML counts them: CR LF, a lone CR and LF each end one.
    let text = String::from_utf8_lossy(data).replace("\r\n", "\n").replace('\r', "\n");
    let lines = text.matches('\n').count() + 1;
    for problem in &loaded.problems {
        assert!(problem.line >= 1 && problem.line <= lines + 1, "{problem} is outside the file");
        assert!(problem.column >= 1, "{problem}");
    }
});
