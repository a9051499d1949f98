# The everyday commands of sandbox-reconciler. Each recipe is one plain command: run it with
# `just <recipe>` (cargo install just), or copy the line.

# List the recipes.
default:
    @just --list

# The main job on a fresh machine: a dry-run sweep of sample centaur sessions.
demo *ARGS:
    bash scripts/demo.sh {{ARGS}}

# The whole test suite, exactly as CI runs it (.ci/run calls it).
test:
    bash scripts/test.sh

# Only the Rust tests of the whole workspace (PostgreSQL must be running:
# bash scripts/ensure-postgres.sh test).
test-rust *ARGS:
    cargo test --locked --workspace --all-targets {{ARGS}}

# Check the deploy files, alert rules and dashboard (installs promtool and the validators).
check-deploy:
    bash scripts/check-deploy.sh

# Write the generated deploy files (PrometheusRule, runbook URLs) after editing alerts.yaml.
generate *ARGS:
    bash scripts/sync-deploy.sh {{ARGS}}

# The full benchmark (release build; figures in docs/PERFORMANCE.md).
bench *ARGS:
    cargo run --locked --release --example bench -- {{ARGS}}

# The benchmark harness at small sizes (part of the test command).
bench-smoke:
    bash scripts/bench-smoke.sh

# The long soak against two daemons and the oracle (docs/RELIABILITY.md): builds the binary,
# then soaks it (the soak runner takes the binary as its argument and never builds it).
soak *ARGS:
    cargo build --locked --release --bin sandbox-reconciler
    cargo run --locked --release --example soak -- target/release/sandbox-reconciler {{ARGS}}

# The mutation audit of the deciding and writing modules (not part of the test command).
mutants *ARGS:
    bash scripts/mutants.sh {{ARGS}}

# Formatting and lints as CI enforces them.
lint:
    cargo fmt --all -- --check
    cargo clippy --locked --workspace --all-targets -- -D warnings
