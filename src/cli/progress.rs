//! What `up` shows: a pull progress bar, one line per instance state change, and the banner
//! with the endpoint and a curl example once every instance is ready.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::daemon::progress::{Observer, PullWatcher};
use crate::daemon::StatusReport;
use crate::reconcile::InstanceStatus;
use crate::runtime::PullProgress;

pub struct Ui {
    mp: MultiProgress,
}

struct PullBar(ProgressBar);

impl PullWatcher for PullBar {
    fn update(&self, p: &PullProgress) {
        if p.total > 0 {
            self.0.set_length(p.total);
            self.0.set_position(p.current);
        }
        self.0.set_message(p.status.clone());
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Ui {
    /// Bars only on a terminal (indicatif hides them elsewhere); lines always.
    pub fn new(interactive: bool) -> Self {
        let target = if interactive && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Ui {
            mp: MultiProgress::with_draw_target(target),
        }
    }

    fn line(&self, s: &str) {
        // Above the bars when they are drawn; plain stderr otherwise.
        if self.mp.is_hidden() {
            eprintln!("{s}");
        } else {
            let _ = self.mp.println(s);
        }
    }
}

impl Observer for Ui {
    fn pulling(&self, image: &str) -> Box<dyn PullWatcher> {
        let bar = self.mp.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("image {image}"));
        Box::new(PullBar(bar))
    }

    fn instance_changed(&self, row: &InstanceStatus) {
        let mut msg = format!("{}: {}", row.instance, row.state);
        if row.restarts > 0 {
            msg.push_str(&format!(" (restarts {}", row.restarts));
            if let Some(e) = &row.last_exit {
                msg.push_str(&format!(", last: {e}"));
            }
            msg.push(')');
        }
        self.line(&msg);
    }

    fn ready(&self, report: &StatusReport) {
        // The banner is the command's result: stdout, above any bars.
        self.mp.suspend(|| println!("{}", banner(report)));
    }

    fn down(&self, project: &str, stopped: usize) {
        self.line(&format!(
            "{project}: down ({stopped} engines stopped and removed)"
        ));
    }
}

/// The endpoint and a request that works against it, as printed by `up`.
pub fn banner(r: &StatusReport) -> String {
    let auth = r
        .api_key_env
        .as_ref()
        .map(|v| format!(" -H \"Authorization: Bearer ${v}\""))
        .unwrap_or_default();
    format!(
        "ready: {} prefill + {} decode ({} runtime)\nOpenAI endpoint: {}/v1\n\n  curl {}/v1/completions -H 'Content-Type: application/json'{auth} \\\n    -d '{{\"model\": \"{}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'\n",
        r.prefill_replicas, r.decode_replicas, r.runtime, r.endpoint, r.endpoint, r.served_model
    )
}
