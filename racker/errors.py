"""The exception hierarchy. The library raises these; only cli.py prints and exits."""

from __future__ import annotations


class RackerError(Exception):
    """Base of every error racker expects. str(err) is the one line a user sees."""

    hint: str | None = None
    # A harness failure that a new machine may well not repeat (a boot that timed out, a guest
    # that died while booting, a lost channel): the pytest plugin retries the test on a new one.
    retryable: bool = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        # What shows how it came about (a failed boot's console), file name -> text: the plugin keeps it.
        self.evidence: dict[str, str] = {}


class ToolMissing(RackerError):
    """A host program racker needs is not installed."""

    def __init__(self, tool: str, package: str | None = None) -> None:
        self.tool = tool
        self.package = package
        hint = f"install it with: apt-get install {package}" if package else None
        super().__init__(f"{tool} is not installed", hint)


class ToolFailed(RackerError):
    """A host program exited with a status the caller did not expect."""

    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        what = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        super().__init__(f"{argv[0]} failed ({what})" + (f": {tail}" if tail else ""))


class ToolTimeout(RackerError):
    """A host program ran longer than its timeout and was killed."""

    def __init__(self, argv: list[str], timeout: float) -> None:
        self.argv = argv
        self.timeout = timeout
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s and was stopped")


class BadSetting(RackerError):
    """A RACKER_* environment variable holds a value racker cannot read (settings.py)."""


class BadReference(RackerError):
    """An image reference that cannot be parsed or names nothing."""


class UnknownImage(BadReference):
    """A catalogue name that does not exist."""


class BadArchive(RackerError):
    """An archive racker refuses to unpack: broken, or with members that would reach outside its root."""


class StoreError(RackerError):
    """The image store refused an operation (image in use, not present, …)."""


class MachineError(RackerError):
    """A machine could not be started, found or entered."""


class UnknownInit(MachineError):
    """The image's init is not one racker knows how to wait for and stop (racker.machines.inits)."""


class NoSuchMachine(MachineError):
    """No running machine has that name."""


class HostLimit(MachineError):
    """A machine could not boot because the host ran out of something: `limit` names it."""

    def __init__(self, message: str, limit: str, hint: str | None = None) -> None:
        self.limit = limit
        super().__init__(message, hint)


class NameTaken(MachineError):
    """A machine name already in use."""


class BootTimeout(MachineError):
    """A machine did not become ready in time; carries the console tail."""

    retryable = True

    def __init__(self, what: str, timeout: float, console_tail: str, hint: str | None = None, *, extended: float = 0.0) -> None:
        self.console_tail = console_tail
        message = f"{what} did not become ready within {timeout:g}s"
        if extended:  # racker.vm.boot_clock gave a starved guest more time
            message += f" (and {extended:.0f}s more, given as the busy host starved it)"
        super().__init__(message, hint=hint or ("last console lines:\n" + console_tail if console_tail else None))


class Unreachable(RackerError):
    """The transport to a guest (ssh, nsenter) failed; not the guest command."""

    retryable = True


class GuestDied(MachineError):
    """The guest died while booting (nspawn exited, the kernel panicked): the harness's failure."""

    retryable = True


class Interrupted(BaseException):
    """SIGTERM arrived; raised so that every `finally` runs.

    A BaseException, as KeyboardInterrupt is (SIGINT), so that no
    `except Exception` or `suppress(Exception)` on the way up swallows it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")


class PrepareError(RackerError):
    """An image cannot be made bootable (no kernel, unsupported distribution, …)."""


class PromoteError(RackerError):
    """A disk cannot be built from an image (too small, not prepared, a failed check)."""


class BadDisk(RackerError):
    """A disk file racker refuses to boot or import (backing file, not a disk, not bootable)."""


class VMError(MachineError):
    """A VM could not be started, found or reached."""


class VMLaunchFailure(VMError):
    """QEMU exited while starting or booting; carries its exit status and the console tail."""

    retryable = True

    def __init__(self, exitcode: int | None, command: list[str], output: str) -> None:
        self.exitcode = exitcode
        self.command = command
        self.output = output
        status = "did not start" if exitcode is None else f"exited with status {exitcode}"
        super().__init__(f"QEMU {status}", hint=("last console lines:\n" + output) if output else None)


class RequirementsFailed(PromoteError):
    """A cloud profile's requirements are not all met; carries every check's result."""

    def __init__(self, message: str, checks: list) -> None:
        self.checks = checks
        super().__init__(message)


class ReportError(RackerError):
    """Results or a previous report that cannot be read."""


class DownloadError(RackerError):
    """A download failed, was refused (untrusted TLS, plain HTTP) or does not match its checksum or signature."""


class ChannelUnavailable(MachineError):
    """A guest cannot run racker's root command channel (no python3 or sudo); commands take sudo each."""


class UpstreamError(RackerError):
    """An upstream's answer does not hold (a bad signature, a digest that does not match, a checksum
    list without the file): the stored image stays as it was."""


class UpstreamUnreachable(UpstreamError):
    """An upstream did not answer (refused, timed out, a server error): the stored image is kept, marked stale."""
