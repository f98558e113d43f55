//! The agent as a Windows service (`estafeta service`, which the MSI registers as the service
//! `Estafeta`). The service control manager's stop and the machine's shutdown drain the agent
//! exactly like SIGTERM on Linux: they resolve the daemon's shutdown future, the ingest API
//! answers 503 and the delivery in flight gets `SHUTDOWN_GRACE_SECS`. At each start the service
//! sets its own recovery actions (restart after 5 s, 30 s, 60 s; also when it stops with an
//! error), because wixl cannot build the MSI's `ServiceConfig` table.
//!
//! Its data live in one folder, `%ProgramData%\Estafeta` unless `--env-file` points elsewhere:
//! `estafeta.env`, `staging\`, `logs\`. The MSI never installs `estafeta.env` itself (wixl drops
//! `NeverOverwrite`, so an upgrade would replace the user's file): it installs
//! `estafeta.env.default` beside the executable, and the service copies it to `estafeta.env`
//! only when that file is missing, writing the data folder's real path where the template says
//! `{DATA_DIR}`. An upgrade therefore never touches the user's settings. Beside it the service
//! writes `ingest-token`, a random `INGEST_TOKEN` the template's `INGEST_TOKEN_FILE` names, when
//! that file is missing (so a packaged install has a token without anyone choosing one, and any
//! local user is not everyone; an existing token is never replaced), and `staging.key`, the key
//! of encryption at rest the template's `STAGING_KEY_FILE` names, protected by DPAPI
//! ([`staging_key`]).
//!
//! The service runs as LocalSystem and trusts that folder, so each start (and `--prepare-only`)
//! secures it first and fails closed, in this order ([`prepare`]):
//! 1. the env file and the token file, when present, must be owned and writable only by
//!    SYSTEM, Administrators or TrustedInstaller ([`acl`]): a standard user who created the
//!    folder first could have planted them. Checked before step 2, which resets owners and
//!    access lists and would hide the plant, and before the env file is read.
//! 2. the folder and everything in it are given to Administrators, and its access list is
//!    narrowed to SYSTEM and Administrators, inherited by everything inside (staged records are
//!    patient data, the token a secret);
//! 3. the two files must still hold what step 1 checked (not swapped meanwhile);
//! 4. only then are missing files written, so they inherit the narrowed list.
//!
//! A failure at any step stops the start with an Application event (source `Estafeta`, see
//! [`eventlog`]) that says why and what an administrator runs; the service never runs on a
//! folder it could not secure.
//! The portable part (the data folder, the env file, the trust decision) is here and tested on
//! every platform; the service control manager part is in the `#[cfg(windows)] mod imp`.

pub mod acl;
#[cfg(windows)]
mod eventlog;
pub mod staging_key;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The service's name in the service control manager (the MSI's `ServiceInstall/@Name`).
pub const SERVICE_NAME: &str = "Estafeta";
/// The env file's name in the data folder.
pub const ENV_FILE_NAME: &str = "estafeta.env";
/// The template the MSI installs beside the executable.
pub use crate::update::install::DEFAULT_ENV_FILE_NAME;
/// What the template says where the data folder's path goes.
pub const DATA_DIR_PLACEHOLDER: &str = "{DATA_DIR}";

/// The data folder when no `--env-file` is given: `%ProgramData%\Estafeta`.
pub fn default_data_dir() -> PathBuf {
    let program_data = std::env::var_os("ProgramData")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"));
    program_data.join("Estafeta")
}

/// Where the service's env file is: `--env-file` when given, else in [`default_data_dir`].
pub fn env_file_path(env_file: Option<&Path>) -> PathBuf {
    env_file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_data_dir().join(ENV_FILE_NAME))
}

/// What [`prepare_env_file`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvFile {
    /// The env file was there and was left exactly as it was.
    Kept,
    /// The env file was missing and was written from the template.
    Created,
}

/// Makes sure `env_file` exists: when it is missing, writes it from the template `default`
/// with [`DATA_DIR_PLACEHOLDER`] replaced by the env file's folder. An existing file is never
/// read or written. The new file is written beside under a temporary name, flushed, then
/// moved into place, so a crash never leaves a half-written env file.
pub fn prepare_env_file(env_file: &Path, default: &Path) -> anyhow::Result<EnvFile> {
    if env_file.exists() {
        return Ok(EnvFile::Kept);
    }
    let dir = env_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("could not create the data folder {}", dir.display()))?;
    let template = std::fs::read_to_string(default).with_context(|| {
        format!(
            "{} is missing and so is its template {}; repair the installation (the MSI installs the template beside estafeta.exe) or write {} yourself",
            env_file.display(),
            default.display(),
            env_file.display()
        )
    })?;
    let dir_text = std::path::absolute(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string();
    let text = template.replace(DATA_DIR_PLACEHOLDER, &dir_text);
    let tmp = dir.join(format!("{ENV_FILE_NAME}.new"));
    let mut file = std::fs::File::create(&tmp)
        .with_context(|| format!("could not write {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("could not write {}", tmp.display()))?;
    drop(file);
    // Another process may have written the file meanwhile: theirs wins, ours is dropped.
    if env_file.exists() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(EnvFile::Kept);
    }
    std::fs::rename(&tmp, env_file)
        .with_context(|| format!("could not move {} into place", tmp.display()))?;
    Ok(EnvFile::Created)
}

/// The template beside the running executable.
pub fn default_env_template() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("could not find the running executable's path")?;
    Ok(exe
        .parent()
        .unwrap_or(Path::new("."))
        .join(DEFAULT_ENV_FILE_NAME))
}

/// `estafeta service --prepare-only`, and every start of the service: secures the data folder
/// and fails closed (the steps are in the module documentation), then creates the env file,
/// the ingest token and the staging key ([`staging_key`]) when missing. Runs on every platform so it can be tested anywhere; the
/// owner and access list steps are Windows only.
pub fn prepare(env_file: Option<&Path>) -> anyhow::Result<(PathBuf, EnvFile)> {
    let env_file = env_file_path(env_file);
    let dir = data_dir_of(&env_file);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("could not create the data folder {}", dir.display()))?;
    let token_file = token_file_path(&env_file);
    // A planted key file would seal patient data with a key its planter holds.
    let key_file = dir.join(staging_key::KEY_FILE_NAME);
    // Read before the check: a file swapped after the read is caught by `ensure_unchanged`, one
    // swapped before it is the file the check sees.
    let before = Snapshot::take(&[&env_file, &token_file, &key_file])?;
    for file in [&env_file, &token_file, &key_file] {
        imp_check_trusted(file).map_err(refuse)?;
    }
    imp_restrict(&dir).map_err(refuse)?;
    before.ensure_unchanged().map_err(refuse)?;
    // After the narrowing, so that new files inherit the narrowed access list.
    let outcome = prepare_env_file(&env_file, &default_env_template()?)?;
    prepare_token_file(&env_file)?;
    if let staging_key::StagingKey::Missing(path) = staging_key::prepare(&dir)? {
        // Not a refusal here: the agent's own start refuses the sealed folder and names the key.
        tracing::warn!(
            "{} is missing and the staging folder holds sealed records: restore the key file (or the copy `estafeta key export` made); no new key was made",
            path.display()
        );
    }
    Ok((env_file, outcome))
}

/// The folder the env file is in: the data folder.
fn data_dir_of(env_file: &Path) -> PathBuf {
    env_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// `ingest-token` beside the env file.
fn token_file_path(env_file: &Path) -> PathBuf {
    data_dir_of(env_file).join(crate::ingest::token::TOKEN_FILE_NAME)
}

/// A refusal to start: on Windows also written to the Application event log, because the
/// service's own log is not open yet and stderr goes nowhere under the service control manager.
fn refuse(message: String) -> anyhow::Error {
    #[cfg(windows)]
    if !eventlog::report_error(&message) {
        eprintln!("estafeta: could not write to the Application event log");
    }
    anyhow::anyhow!(message)
}

/// What the trusted files held when they were checked, to prove they were not replaced while
/// the folder was still open to their owner (between the check and the narrowing).
#[derive(Debug)]
struct Snapshot {
    files: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl Snapshot {
    /// Reads each file (`None` when it does not exist).
    fn take(paths: &[&Path]) -> anyhow::Result<Snapshot> {
        let files = paths
            .iter()
            .map(|path| Ok((path.to_path_buf(), read_if_present(path)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Snapshot { files })
    }

    /// Ok when every file holds the same bytes as at [`Snapshot::take`] (or is still missing).
    fn ensure_unchanged(&self) -> Result<(), String> {
        for (path, before) in &self.files {
            let now = read_if_present(path).map_err(|err| format!("{err:#}"))?;
            if &now != before {
                return Err(format!(
                    "the service will not start: {} was {} while the service was securing its data folder, so someone with access to that folder is changing it; as an administrator, find out who (the folder's owner before the start), check the file's content, then start the service again",
                    path.display(),
                    if before.is_none() {
                        "created"
                    } else {
                        "changed or replaced"
                    }
                ));
            }
        }
        Ok(())
    }
}

fn read_if_present(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| {
            format!(
                "could not read {}; as an administrator, check the file's permissions",
                path.display()
            )
        }),
    }
}

/// Writes a random token to `ingest-token` beside `env_file` when that file is missing (see the
/// module documentation); returns its path.
pub fn prepare_token_file(env_file: &Path) -> anyhow::Result<PathBuf> {
    let path = token_file_path(env_file);
    crate::ingest::token::write_if_missing(&path)?;
    Ok(path)
}

/// Refuses `file` when someone other than SYSTEM, Administrators, TrustedInstaller or the
/// account running estafeta owns it or may change it; a missing file is fine (the service writes it after the narrowing).
#[cfg(windows)]
fn imp_check_trusted(file: &Path) -> Result<(), String> {
    if !file.exists() {
        return Ok(());
    }
    let (owner, aces) = acl::read(file).map_err(|err| {
        format!(
            "the service will not start: could not read the owner and permissions of {} ({err}); as an administrator, check the file, then run: {}",
            file.display(),
            acl::reset_command(file)
        )
    })?;
    let running_as = acl::current_user().map_err(|err| {
        format!("the service will not start: could not read which account runs it ({err}); check that estafeta.exe runs as LocalSystem (services.msc)")
    })?;
    acl::check_trusted(&owner, &aces, &running_as).map_err(|why| acl::refusal(file, &why))
}

#[cfg(not(windows))]
fn imp_check_trusted(_file: &Path) -> Result<(), String> {
    Ok(())
}

#[cfg(windows)]
fn imp_restrict(dir: &Path) -> Result<(), String> {
    imp::restrict_access(dir)
}

#[cfg(not(windows))]
fn imp_restrict(_dir: &Path) -> Result<(), String> {
    Ok(())
}

/// Runs the agent as the Windows service (blocks until the service stops).
#[cfg(windows)]
pub fn run(env_file: Option<&Path>) -> anyhow::Result<()> {
    imp::run(env_file_path(env_file))
}

#[cfg(windows)]
#[allow(unsafe_code)] // `define_windows_service!` expands to the FFI entry point the SCM calls.
mod imp {
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::Duration;

    use anyhow::Context as _;
    use tokio_util::sync::CancellationToken;
    use windows_service::service::{
        ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
        ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod, ServiceState,
        ServiceStatus, ServiceType,
    };
    use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
    use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
    use windows_service::{define_windows_service, service_dispatcher};

    use super::SERVICE_NAME;

    /// Restart delays after the first, second and later failures.
    const RESTART_DELAYS: [Duration; 3] = [
        Duration::from_secs(5),
        Duration::from_secs(30),
        Duration::from_secs(60),
    ];
    /// The failure count resets after a day without failures.
    const FAILURE_RESET: Duration = Duration::from_secs(24 * 60 * 60);
    /// What the SCM is told a start may take (opening a large backlog).
    const START_WAIT_HINT: Duration = Duration::from_secs(60);

    /// The env file, handed from `run` to the service thread the SCM starts.
    static ENV_FILE: OnceLock<PathBuf> = OnceLock::new();

    define_windows_service!(ffi_service_main, service_main);

    pub fn run(env_file: PathBuf) -> anyhow::Result<()> {
        let _ = ENV_FILE.set(env_file);
        service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
            "could not connect to the service control manager; `estafeta service` is started by Windows (sc start Estafeta), use `estafeta run` in a console",
        )
    }

    fn service_main(_arguments: Vec<OsString>) {
        // Errors before logging is set up have nowhere else to go: the SCM records the exit code.
        if let Err(err) = run_service() {
            eprintln!("estafeta service: {err:#}");
        }
    }

    fn status(
        state: ServiceState,
        accept: ServiceControlAccept,
        exit: u32,
        wait: Duration,
    ) -> ServiceStatus {
        ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accept,
            exit_code: if exit == 0 {
                ServiceExitCode::Win32(0)
            } else {
                ServiceExitCode::ServiceSpecific(exit)
            },
            checkpoint: 0,
            wait_hint: wait,
            process_id: None,
        }
    }

    fn run_service() -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let stop_requested = stop.clone();
        let handle =
            service_control_handler::register(SERVICE_NAME, move |control| match control {
                ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
                    stop_requested.cancel();
                    ServiceControlHandlerResult::NoError
                }
                ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
                _ => ServiceControlHandlerResult::NotImplemented,
            })
            .context("could not register the service control handler")?;
        let report = |s: ServiceStatus| {
            let _ = handle.set_service_status(s);
        };
        report(status(
            ServiceState::StartPending,
            ServiceControlAccept::empty(),
            0,
            START_WAIT_HINT,
        ));

        let env_file = ENV_FILE
            .get()
            .cloned()
            .unwrap_or_else(|| super::env_file_path(None));
        let exit = match start_agent(&env_file, &stop, handle) {
            Ok(()) => 0,
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "The Windows service stopped with an error.");
                eprintln!("estafeta service: {err:#}");
                1
            }
        };
        report(status(
            ServiceState::Stopped,
            ServiceControlAccept::empty(),
            exit,
            Duration::ZERO,
        ));
        Ok(())
    }

    fn start_agent(
        env_file: &Path,
        stop: &CancellationToken,
        handle: service_control_handler::ServiceStatusHandle,
    ) -> anyhow::Result<()> {
        // Fails closed, with an Application event, before the env file is read.
        super::prepare(Some(env_file))?;
        let dir = super::data_dir_of(env_file);
        let token_file = super::token_file_path(env_file);
        // Relative paths in the env file (and the embedded sqlite://central.db) land here, not
        // in C:\Windows\System32, the SCM's working directory.
        std::env::set_current_dir(&dir)
            .with_context(|| format!("could not enter the data folder {}", dir.display()))?;
        let config = crate::config::Config::load(Some(env_file))?;
        let _guard = crate::logging::init(&config);
        if config.ingest_token.is_none() {
            // An env file written by a version before the token: it is the user's, never edited.
            tracing::warn!(env_file = %env_file.display(), "The ingest API has no token, so any local user can stage records and read the status: add the line INGEST_TOKEN_FILE={} to the env file (the service keeps a random token there) and restart the service; then give that token to the applications that send records.", token_file.display());
        }
        if let Err(err) = set_recovery_actions() {
            tracing::warn!(error = %err, "Could not set the service's recovery actions; set them in services.msc (Recovery: restart the service).");
        }
        let grace = config.shutdown_grace;
        // "Running" only once the store is open and the port bound (the daemon's `ready`): an
        // MSI upgrade starts the service and waits for this (`ServiceControl Wait="yes"`), so a
        // new version that cannot start fails the upgrade and Windows Installer puts the
        // previous version back.
        let on_ready: crate::daemon::OnReady = Box::new(move || {
            if let Err(err) = handle.set_service_status(status(
                ServiceState::Running,
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN,
                0,
                Duration::ZERO,
            )) {
                tracing::error!(error = %err, "Could not report the service as running.");
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("could not start the async runtime")?;
        let stop = stop.clone();
        runtime.block_on(crate::daemon::run_reporting_ready(
            config,
            async move {
                stop.cancelled().await;
                tracing::info!(signal = "service stop", "Stop requested.");
                let _ = handle.set_service_status(status(
                    ServiceState::StopPending,
                    ServiceControlAccept::empty(),
                    0,
                    grace + Duration::from_secs(5),
                ));
            },
            on_ready,
        ))
    }

    /// Restart on failure, set by the agent itself (wixl cannot build `ServiceConfig`).
    fn set_recovery_actions() -> anyhow::Result<()> {
        let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
            .context("could not open the service control manager")?;
        let service = manager
            .open_service(
                SERVICE_NAME,
                ServiceAccess::CHANGE_CONFIG | ServiceAccess::QUERY_CONFIG,
            )
            .context("could not open the Estafeta service's configuration")?;
        let actions = RESTART_DELAYS
            .iter()
            .map(|delay| ServiceAction {
                action_type: ServiceActionType::Restart,
                delay: *delay,
            })
            .collect();
        service
            .update_failure_actions(ServiceFailureActions {
                reset_period: ServiceFailureResetPeriod::After(FAILURE_RESET),
                reboot_msg: None,
                command: None,
                actions: Some(actions),
            })
            .context("could not set the restart actions")?;
        service
            .set_failure_actions_on_non_crash_failures(true)
            .context("could not apply the restart actions to stops with an error")?;
        Ok(())
    }

    /// Gives the data folder and everything in it to Administrators, then narrows the folder's
    /// access list to SYSTEM and Administrators (by SID, so it works on a Windows in any
    /// language), inherited by everything inside. The error is the refusal to start: it says
    /// what failed and the commands an administrator runs.
    pub fn restrict_access(dir: &Path) -> Result<(), String> {
        const OWNER: [&str; 4] = ["/setowner", "*S-1-5-32-544", "/T", "/Q"];
        const GRANTS: [&str; 5] = [
            "/inheritance:r",
            "/grant:r",
            "*S-1-5-18:(OI)(CI)F",
            "*S-1-5-32-544:(OI)(CI)F",
            "/Q",
        ];
        let hint = format!(
            "the service will not start on a data folder other users may control (staged records are patient data, the env file its configuration); as an administrator run: icacls \"{0}\" {1} && icacls \"{0}\" {2}",
            dir.display(),
            OWNER.join(" "),
            GRANTS.join(" ")
        );
        for (what, args) in [
            ("give it to Administrators", &OWNER[..]),
            ("narrow it to SYSTEM and Administrators", &GRANTS[..]),
        ] {
            match std::process::Command::new("icacls")
                .arg(dir)
                .args(args)
                .output()
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    return Err(format!(
                        "icacls could not {what} ({}: {}{}); {hint}",
                        dir.display(),
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                Err(err) => {
                    return Err(format!(
                        "could not run icacls to {what} ({}: {err}); {hint}",
                        dir.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_env_file_is_written_from_the_template_with_the_data_dir() {
        let dir = tempfile::tempdir().expect("temp dir");
        let template = dir.path().join(DEFAULT_ENV_FILE_NAME);
        std::fs::write(&template, "STAGING_AREA_PATH={DATA_DIR}/staging\n").expect("template");
        let env_file = dir.path().join("data").join(ENV_FILE_NAME);
        assert_eq!(
            prepare_env_file(&env_file, &template).expect("prepare"),
            EnvFile::Created
        );
        let text = std::fs::read_to_string(&env_file).expect("env file");
        let data = std::path::absolute(dir.path().join("data")).expect("absolute");
        assert_eq!(
            text,
            format!("STAGING_AREA_PATH={}/staging\n", data.display())
        );
        assert!(!dir.path().join("data").join("estafeta.env.new").exists());
    }

    #[test]
    fn existing_env_file_survives_a_new_template_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let template = dir.path().join(DEFAULT_ENV_FILE_NAME);
        std::fs::write(&template, "CRONTAB=\"* * * * *\"\n").expect("template");
        let env_file = dir.path().join(ENV_FILE_NAME);
        std::fs::write(&env_file, "CRONTAB=\"*/5 * * * *\" # edited by the user\n").expect("env");
        // An upgrade ships a different template: the user's file stays byte for byte.
        std::fs::write(&template, "CRONTAB=\"0 * * * *\"\nNEW_KEY=1\n").expect("template");
        assert_eq!(
            prepare_env_file(&env_file, &template).expect("prepare"),
            EnvFile::Kept
        );
        assert_eq!(
            std::fs::read_to_string(&env_file).expect("env"),
            "CRONTAB=\"*/5 * * * *\" # edited by the user\n"
        );
    }

    #[test]
    fn missing_template_and_env_file_say_how_to_repair() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = prepare_env_file(
            &dir.path().join(ENV_FILE_NAME),
            &dir.path().join("nowhere.default"),
        )
        .expect_err("nothing to copy");
        assert!(format!("{err:#}").contains("repair the installation"));
    }

    #[test]
    fn files_left_alone_while_the_folder_is_secured_pass() {
        let dir = tempfile::tempdir().expect("temp dir");
        let env_file = dir.path().join(ENV_FILE_NAME);
        std::fs::write(&env_file, "CRONTAB=\"* * * * *\"\n").expect("env");
        let token_file = token_file_path(&env_file);
        let before = Snapshot::take(&[&env_file, &token_file]).expect("snapshot");
        assert_eq!(before.ensure_unchanged(), Ok(()));
    }

    #[test]
    fn an_env_file_replaced_while_the_folder_is_secured_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let env_file = dir.path().join(ENV_FILE_NAME);
        std::fs::write(&env_file, "CENTRAL_API_URL=http://central.example/api\n").expect("env");
        let before = Snapshot::take(&[&env_file]).expect("snapshot");
        // The folder's owner swaps the checked file for a planted one before the narrowing.
        std::fs::remove_file(&env_file).expect("remove");
        std::fs::write(&env_file, "CENTRAL_API_URL=http://attacker.example/api\n").expect("plant");
        let err = before.ensure_unchanged().expect_err("replaced");
        assert!(err.contains("will not start"), "{err}");
        assert!(err.contains("changed or replaced"), "{err}");
        assert!(err.contains(&env_file.display().to_string()), "{err}");
    }

    #[test]
    fn a_token_file_planted_while_the_folder_is_secured_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = token_file_path(&dir.path().join(ENV_FILE_NAME));
        let before = Snapshot::take(&[&token_file]).expect("snapshot");
        std::fs::write(&token_file, "a token the attacker knows\n").expect("plant");
        let err = before.ensure_unchanged().expect_err("planted");
        assert!(err.contains("was created while"), "{err}");
    }
}
