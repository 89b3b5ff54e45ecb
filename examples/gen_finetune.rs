//! Write a fine-tune of a model directory: every float weight moved by about SCALE of its std.
//!
//! cargo run --release --example gen_finetune -- BASE_DIR OUT_DIR [SCALE]

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, out, rest @ ..] = &args[..] else { panic!("usage: gen_finetune BASE_DIR OUT_DIR [SCALE]") };
    let scale: f32 = rest.first().map_or(0.01, |s| s.parse().expect("SCALE is a number"));
    llmfs::demo::write_finetune(std::path::Path::new(base), std::path::Path::new(out), scale, 11)
}
