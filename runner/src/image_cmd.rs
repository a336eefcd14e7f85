//! `kiln image pull|ls|rm|prune`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_images::pull::short;
use kiln_images::store;
use kiln_images::{Cache, ImageSource, Images, ImagesOptions, PullProgress, Reference};

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Pull an image (registry reference, OCI layout dir or image tar) and
    /// build its root filesystem; the tag is always checked with the registry.
    Pull {
        /// NAME[:TAG][@DIGEST], DIR[:TAG] or FILE.tar[:TAG].
        image: String,
        /// Allow plain HTTP to this registry (loopback registries always may).
        #[arg(long)]
        insecure: bool,
    },
    /// List pulled registry images.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget an image and delete its blobs and rootfs unless another image
    /// uses them.
    Rm {
        /// NAME[:TAG][@DIGEST] as pulled.
        image: String,
    },
    /// Delete unreferenced blobs and root filesystems, then the least recently
    /// used entries until the cache fits --max-size.
    Prune {
        /// Size bound, e.g. 10G or 500M (default $KILN_CACHE_MAX_GB or 20G).
        #[arg(long)]
        max_size: Option<String>,
        /// Remove everything, image records included.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(cmd: ImageCmd, cache_dir: &Path, options: ImagesOptions) -> Result<ExitCode> {
    let cache = Cache::open(cache_dir)?;
    match cmd {
        ImageCmd::Pull { image, insecure } => pull(&cache, &image, insecure, options),
        ImageCmd::Ls { json } => {
            let recs = store::list_records(&cache);
            if json {
                println!("{}", serde_json::to_string_pretty(&recs)?);
            } else if recs.is_empty() {
                println!("no pulled images");
            } else {
                println!(
                    "{:<50} {:<19} {:>10}  ROOTFS",
                    "REFERENCE", "DIGEST", "SIZE"
                );
                for r in recs {
                    let built = std::fs::read_dir(cache.dir("rootfs"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| {
                            e.file_name()
                                .to_string_lossy()
                                .starts_with(r.chain_id.trim_start_matches("sha256:"))
                        });
                    println!(
                        "{:<50} {:<19} {:>10}  {}",
                        r.reference,
                        short(&r.digest),
                        human(r.size),
                        if built { "built" } else { "-" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::Rm { image } => {
            let r = Reference::parse(&image)?;
            let Some(rec) = store::remove_record(&cache, &r) else {
                bail!("{r} is not in the cache (see `kiln image ls`)");
            };
            // Only what no other record names goes.
            let report = store::prune(&cache, true, None)?;
            println!(
                "removed {} ({} entries, {} freed)",
                rec.reference,
                report.removed.len(),
                human(report.freed_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
        ImageCmd::Prune { max_size, all } => {
            if all {
                for r in store::list_records(&cache) {
                    if let Ok(reference) = Reference::parse(&r.reference) {
                        store::remove_record(&cache, &reference);
                    }
                }
            }
            let max = match (&max_size, all) {
                (_, true) => Some(0),
                (Some(s), _) => Some(parse_size(s)?),
                (None, _) => Some(options.cache_max_bytes),
            };
            let report = store::prune(&cache, true, max)?;
            println!(
                "removed {} entries, freed {}, {} left",
                report.removed.len(),
                human(report.freed_bytes),
                human(report.remaining_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pull(
    cache: &Cache,
    image: &str,
    insecure: bool,
    mut options: ImagesOptions,
) -> Result<ExitCode> {
    let source = ImageSource::parse(image)?;
    if insecure {
        if let ImageSource::Registry(r) = &source {
            options.registry.insecure.insert(r.registry.clone());
        }
    }
    let images = Images::new(cache.clone(), options)?;
    let progress: Arc<dyn PullProgress> = Arc::new(Bars::new());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t0 = std::time::Instant::now();
    let rootfs = rt
        .block_on(images.pull(&source, progress.clone()))
        .with_context(|| format!("pulling {image}"))?;
    progress.stage("");
    println!(
        "{} → {} ({}, {}) in {:.2} s",
        rootfs.source,
        rootfs.image.display(),
        rootfs.fstype,
        short(&rootfs.chain_id),
        t0.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Progress bars on a terminal, plain lines otherwise.
struct Bars {
    tty: bool,
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    stage: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            tty: std::io::stderr().is_terminal(),
            multi: MultiProgress::new(),
            bars: Mutex::default(),
            stage: Mutex::default(),
        }
    }
}

impl PullProgress for Bars {
    fn layer_start(&self, digest: &str, size: u64, cached: bool) {
        if !self.tty {
            eprintln!(
                "{} {} ({})",
                short(digest),
                if cached { "cached" } else { "downloading" },
                human(size)
            );
            return;
        }
        let pb = self.multi.add(ProgressBar::new(size));
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix(short(digest).to_string());
        if cached {
            pb.set_position(size);
            pb.finish_with_message("cached");
        }
        if let Ok(mut m) = self.bars.lock() {
            m.insert(digest.to_string(), pb);
        }
    }

    fn layer_bytes(&self, digest: &str, bytes: u64) {
        if let Some(pb) = self.bars.lock().ok().and_then(|m| m.get(digest).cloned()) {
            pb.inc(bytes);
        }
    }

    fn layer_done(&self, digest: &str) {
        if !self.tty {
            return;
        }
        if let Some(pb) = self.bars.lock().ok().and_then(|m| m.get(digest).cloned()) {
            if !pb.is_finished() {
                pb.finish_with_message("done");
            }
        }
    }

    fn stage(&self, msg: &str) {
        if !self.tty {
            if !msg.is_empty() {
                eprintln!("{msg}");
            }
            return;
        }
        let Ok(mut s) = self.stage.lock() else { return };
        if msg.is_empty() {
            if let Some(pb) = s.take() {
                pb.finish_and_clear();
            }
            return;
        }
        let pb = s.get_or_insert_with(|| {
            let pb = self.multi.add(ProgressBar::new_spinner());
            pb.enable_steady_tick(std::time::Duration::from_millis(100));
            pb
        });
        pb.set_message(msg.to_string());
    }
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// `10G`, `500M`, `1.5GiB`, `123` (bytes).
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("bad size {s:?} (e.g. 10G, 500M)"))?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("bad size unit in {s:?} (K, M, G or T)"),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
    }
}
