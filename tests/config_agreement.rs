//! The settings the service reads (`config::SETTINGS`), `.default.env`, the compose
//! file, the Grafana provisioning, the README and the Dockerfile agree. Plain text
//! checks: no Docker needed.

use os_credits::config::{Settings, SETTINGS};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Variables `.default.env` documents for `make up-dev` and docker compose, which the
/// service itself never reads.
const DEV_ONLY: &[&str] = &[
    "DEMO_EXPORTER_PORT",
    "DEMO_EXPORTER_ARGS",
    "PG_PRIVATE_PORT",
    "PG_TIMESCALEDB_PORT",
    "DEV_POSTGRES_PORT",
    "GRAFANA_PORT",
    "GRAFANA_ADMIN_PASSWORD",
    "MAILPIT_UI_PORT",
];

/// The line in `.default.env` after which only dev-only variables follow.
const DEV_ONLY_HEADER: &str = "# --- Used by `make up-dev` and docker compose only";

fn read(path: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `NAME=value` or `# NAME=value` lines of `.default.env`: (name, value, commented out,
/// line number).
fn default_env() -> Vec<(String, String, bool, usize)> {
    read(".default.env")
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let (commented, rest) = match line.strip_prefix('#') {
                Some(rest) => (true, rest.trim_start()),
                None => (false, line),
            };
            let (name, value) = rest.split_once('=')?;
            is_env_name(name).then(|| (name.to_owned(), unquote(value), commented, i + 1))
        })
        .collect()
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    for quote in ['"', '\''] {
        if let Some(inner) = value
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            return inner.to_owned();
        }
    }
    value.to_owned()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The lines nested under `header` (a YAML key at `depth` spaces), up to the next
/// line indented as little; comments and blank lines are dropped.
fn block<'a>(lines: &[&'a str], header: &str, depth: usize) -> Vec<&'a str> {
    let start = lines
        .iter()
        .position(|line| indent(line) == depth && line.trim() == header)
        .unwrap_or_else(|| panic!("no `{header}` at indentation {depth}"));
    lines[start + 1..]
        .iter()
        .copied()
        .filter(|line| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .take_while(|line| indent(line) > depth)
        .collect()
}

/// `key: value` entries of a mapping whose keys sit at `depth` spaces.
fn mapping(lines: &[&str], depth: usize) -> Vec<(String, String)> {
    lines
        .iter()
        .filter(|line| indent(line) == depth)
        .filter_map(|line| {
            let (key, value) = line.trim().split_once(':')?;
            Some((key.to_owned(), unquote(value)))
        })
        .collect()
}

fn compose_service(name: &str) -> Vec<String> {
    let compose = read("docker-compose.yml");
    let lines: Vec<&str> = compose.lines().collect();
    let services = block(&lines, "services:", 0);
    block(&services, &format!("{name}:"), 2)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

fn compose_environment(service: &str) -> Vec<(String, String)> {
    let lines = compose_service(service);
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    mapping(&block(&lines, "environment:", 4), 6)
}

fn compose_services() -> BTreeSet<String> {
    let compose = read("docker-compose.yml");
    let lines: Vec<&str> = compose.lines().collect();
    mapping(&block(&lines, "services:", 0), 2)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Names used as `$NAME` or `${NAME…}` in a YAML file, comments aside.
fn referenced_variables(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        if rest.starts_with('$') {
            // `$$` is a literal dollar in compose and in Grafana provisioning
            rest = &rest[1..];
            continue;
        }
        let name_part = rest.strip_prefix('{').unwrap_or(rest);
        let end = name_part
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name_part.len());
        if end > 0 {
            names.insert(name_part[..end].to_owned());
        }
    }
    names
}

/// A compose value with `${NAME:-default}` replaced by its default.
fn with_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${…}") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, d)| d).unwrap_or_default());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn settings() -> BTreeSet<&'static str> {
    SETTINGS.iter().copied().collect()
}

#[test]
fn every_setting_is_documented_in_default_env() {
    let documented: BTreeSet<String> = default_env().into_iter().map(|(n, ..)| n).collect();
    for name in SETTINGS {
        assert!(
            documented.contains(*name),
            ".default.env does not document {name} (as `{name}=` or `# {name}=`)"
        );
    }
}

#[test]
fn default_env_names_only_settings_and_dev_only_variables() {
    let text = read(".default.env");
    let header = text
        .lines()
        .position(|line| line.starts_with(DEV_ONLY_HEADER))
        .map(|i| i + 1)
        .expect(".default.env has the dev-only section");
    let entries = default_env();
    for (name, _, _, line) in &entries {
        if DEV_ONLY.contains(&name.as_str()) {
            assert!(
                *line > header,
                ".default.env:{line}: {name} belongs in the dev-only section"
            );
        } else {
            assert!(
                settings().contains(name.as_str()),
                ".default.env:{line}: the service does not read {name}"
            );
            assert!(
                *line < header,
                ".default.env:{line}: {name} is a setting, not dev-only"
            );
        }
    }
    for name in DEV_ONLY {
        assert!(
            entries.iter().any(|(n, ..)| n == name),
            "{name} is listed as dev-only but .default.env does not document it"
        );
    }
}

#[test]
fn the_compose_service_gets_only_settings_it_reads_and_they_are_valid() {
    let service = compose_service("os-credits");
    assert!(
        service
            .iter()
            .any(|line| line.trim() == "- path: .default.env"),
        "the compose service reads .default.env"
    );
    let environment = compose_environment("os-credits");
    assert!(!environment.is_empty(), "the service has an environment");
    for (name, _) in &environment {
        assert!(
            settings().contains(name.as_str()),
            "docker-compose.yml gives the service {name}, which it does not read"
        );
    }
    // What the container gets: .default.env's values, the compose environment over
    // them (`${X:-default}` at its default). The service must accept it.
    let mut vars: Vec<(String, String)> = default_env()
        .into_iter()
        .filter(|(_, _, commented, _)| !commented)
        .map(|(name, value, ..)| (name, value))
        .collect();
    vars.extend(
        environment
            .iter()
            .map(|(name, value)| (name.clone(), with_defaults(value))),
    );
    let settings = Settings::from_vars(vars).unwrap_or_else(|e| {
        panic!("the compose service's settings are refused: {e}");
    });
    // Every host it is pointed at is a service of the compose file.
    let services = compose_services();
    let mut hosts = vec![settings.database.host.clone()];
    hosts.extend(settings.mail.smtp_server.clone());
    hosts.extend(
        settings
            .scrape
            .targets
            .iter()
            .filter_map(|t| t.url.host_str().map(str::to_owned)),
    );
    assert!(hosts.len() >= 3, "database, mail and a target: {hosts:?}");
    for host in hosts {
        assert!(
            services.contains(&host),
            "the service is pointed at {host}, not a compose service ({services:?})"
        );
    }
    assert_eq!(
        settings.mail.tls,
        os_credits::config::SmtpTls::None,
        "the mail catcher speaks plain SMTP"
    );
}

#[test]
fn every_variable_the_compose_file_interpolates_is_documented() {
    let documented: BTreeSet<String> = default_env().into_iter().map(|(n, ..)| n).collect();
    for name in referenced_variables(&read("docker-compose.yml")) {
        assert!(
            documented.contains(&name),
            "docker-compose.yml reads ${{{name}}}, which .default.env does not document"
        );
    }
}

#[test]
fn grafana_gets_every_variable_its_provisioning_reads() {
    let provided: BTreeSet<String> = compose_environment("grafana")
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for file in [
        "grafana/provisioning/datasources/postgres.yaml",
        "grafana/provisioning/dashboards/dashboards.yaml",
    ] {
        for name in referenced_variables(&read(file)) {
            assert!(
                provided.contains(&name),
                "{file} reads ${name}; the compose grafana service does not set it"
            );
        }
    }
    let grafana = compose_service("grafana").join("\n");
    for mount in [
        "./grafana/provisioning:/etc/grafana/provisioning",
        "./grafana/dashboards:/etc/grafana/dashboards",
    ] {
        assert!(grafana.contains(mount), "grafana mounts {mount}");
    }
    assert!(
        read("grafana/provisioning/dashboards/dashboards.yaml")
            .contains("path: /etc/grafana/dashboards"),
        "the dashboard provider reads the mounted folder"
    );
}

#[test]
fn the_readme_settings_table_lists_every_setting() {
    let readme = read("README.md");
    let section = readme
        .split("\n## Settings\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Settings section");
    let listed: BTreeSet<&str> = section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name))
        .collect();
    assert_eq!(
        listed,
        settings(),
        "README's Settings table and config::SETTINGS differ"
    );
}

#[test]
fn the_image_runs_as_a_non_root_user_with_a_ping_health_check() {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let user = runtime
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !matches!(user.trim(), "root" | "0"),
        "the image runs as {user}"
    );
    let healthcheck = runtime
        .split("HEALTHCHECK")
        .nth(1)
        .expect("the runtime stage has a HEALTHCHECK");
    assert!(healthcheck.contains("/ping"), "the health check asks /ping");
    // The build compiles in what `include_str!`/`include_bytes!` name: those folders must be copied.
    let mut folders = BTreeSet::new();
    collect_included_folders(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut folders,
    );
    assert!(
        folders.contains("sql"),
        "migrations are included: {folders:?}"
    );
    for folder in folders {
        assert!(
            dockerfile
                .lines()
                .any(|line| line.trim() == format!("COPY {folder} {folder}")),
            "the build stage needs `COPY {folder} {folder}` (include_str! reads it)"
        );
    }
    let makefile = read("Makefile");
    assert!(
        makefile.contains("docker-build:")
            && makefile.contains("docker build -t os-credits:$(VERSION)"),
        "make docker-build tags the image with the package version"
    );
}

/// Top-level folders of the repository that `include_str!`/`include_bytes!` in `dir`
/// read from.
fn collect_included_folders(dir: &std::path::Path, folders: &mut BTreeSet<String>) {
    const MACROS: [&str; 2] = ["include_str!(\"", "include_bytes!(\""];
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .expect("repository root");
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_included_folders(&path, folders);
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut rest = text.as_str();
        while let Some((at, len)) = MACROS
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, m.len())))
            .min()
        {
            rest = &rest[at + len..];
            let target = rest.split('"').next().unwrap_or_default();
            let Some(parent) = path.parent() else {
                continue;
            };
            let Ok(file) = parent.join(target).canonicalize() else {
                continue;
            };
            let folder = file
                .strip_prefix(&root)
                .ok()
                .and_then(|inside| inside.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            if let Some(folder) = folder.filter(|f| f != "src") {
                folders.insert(folder);
            }
        }
    }
}
