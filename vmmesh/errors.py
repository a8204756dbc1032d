"""One exception root, precise subclasses, and the codes they travel as.

Two families, as in h11: errors that mean *you* (the local user or caller)
asked for something wrong, and errors that mean a *peer* or the machine
misbehaved.  Every subclass has one exact meaning; the CLI prints
``str(exc)`` as a one-line message and never a traceback for these.

Across a connection an error travels as a ``Fail`` carrying an
``ErrorCode`` and its message.  The caller turns the code back into the same
class (``from_code``), so ``except PackageInstallError`` works whether the
install failed here or on a peer.  A code this version does not know arrives
as ``RemoteError``.

A third kind is neither: ``InternalError`` is a broken invariant, a bug in
vmmesh.  It travels as ``internal`` (as does any exception a handler did not
mean to raise), and the CLI says "a bug in vmmesh, see the node's log" with
exit status 70 (EX_SOFTWARE) instead of blaming the user.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ErrorCode(enum.StrEnum):
    """The wire name of each error class (stable: peers of other versions read it)."""

    USAGE = "usage"
    CONFIG = "config"
    NOT_INITIALIZED = "not_initialized"
    NOT_FOUND = "not_found"
    NODE_NOT_RUNNING = "node_not_running"
    PROTOCOL = "protocol"
    FRAME_TOO_LARGE = "frame_too_large"
    MALFORMED = "malformed"
    UNKNOWN_MESSAGE = "unknown_message"
    PEER_UNAVAILABLE = "peer_unavailable"
    AUTH = "auth"
    TOKEN = "token"
    REVOKED = "revoked"
    HYPERVISOR = "hypervisor"
    QMP = "qmp"
    GUEST_AGENT = "guest_agent"
    IMAGE = "image"
    INTEGRITY = "integrity"
    PACKAGE_INSTALL = "package_install"
    PACKAGE_SOURCE = "package_source"
    CAPACITY = "capacity"
    STATE = "state"
    TRANSFER = "transfer"
    JOB = "job"
    JOB_INPUT = "job_input"
    JOB_NO_VM = "job_no_vm"
    JOB_LOST = "job_lost"
    JOB_OUTPUT = "job_output"
    INTERNAL = "internal"


class VmmeshError(Exception):
    """Root of every error vmmesh raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __str__(self) -> str:
        # Never an empty reason: an operator reads these one per line.
        text = super().__str__()
        return text if text.strip() else type(self).__name__


# --- the caller or user asked for something wrong -------------------------


class UsageError(VmmeshError):
    """Bad arguments or input from the local user."""

    code = ErrorCode.USAGE


class ConfigError(VmmeshError):
    """The configuration (file, environment, flags) is invalid."""

    code = ErrorCode.CONFIG


class NotInitialized(VmmeshError):
    """This host has no mesh identity yet (run `vmmesh init` or `vmmesh join`)."""

    code = ErrorCode.NOT_INITIALIZED


class NotFound(VmmeshError):
    """A named thing (VM, template, host, image) does not exist."""

    code = ErrorCode.NOT_FOUND


class NodeNotRunning(VmmeshError):
    """The local node's control socket does not answer."""

    code = ErrorCode.NODE_NOT_RUNNING


class SubnetInUse(UsageError):
    """A lab's 10.213.<k>.0/24 is already on an interface of this machine."""


# --- a bug in vmmesh --------------------------------------------------------


class InternalError(VmmeshError):
    """A broken invariant: code was called in a way it never should be (a bug in
    vmmesh, not bad input; the traceback is in the log of whoever raised it)."""

    code = ErrorCode.INTERNAL


# --- peers and the wire ---------------------------------------------------


class ProtocolError(VmmeshError):
    """A peer sent something that breaks the protocol."""

    code = ErrorCode.PROTOCOL


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is over the limit."""

    code = ErrorCode.FRAME_TOO_LARGE


class MalformedMessage(ProtocolError):
    """Bytes that are not msgpack, or msgpack of the wrong shape."""

    code = ErrorCode.MALFORMED


class UnknownMessage(ProtocolError):
    """A well-formed message of a kind or method we do not know."""

    code = ErrorCode.UNKNOWN_MESSAGE


class RemoteError(VmmeshError):
    """The peer failed in a way this version has no class for (a bug there, or a
    code from a newer version); ``code`` is what it sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.remote_code = code


class PeerUnavailable(VmmeshError):
    """The transport to a peer failed or the peer does not answer."""

    code = ErrorCode.PEER_UNAVAILABLE


class AuthError(VmmeshError):
    """Certificates, keys or the TLS handshake did not check out."""

    code = ErrorCode.AUTH


class TokenError(AuthError):
    """A join token is malformed, used, expired or unknown."""

    code = ErrorCode.TOKEN


class Revoked(AuthError):
    """The host has been removed from the mesh."""

    code = ErrorCode.REVOKED


# --- the machine ----------------------------------------------------------


class HypervisorError(VmmeshError):
    """QEMU or qemu-img failed."""

    code = ErrorCode.HYPERVISOR


class QemuImgFailed(HypervisorError):
    """qemu-img exited with a non-zero ``returncode`` (``qemu-img check``: 3 is
    leaked clusters only, 2 corruption, 1 could not check)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class QMPError(HypervisorError):
    """The QEMU monitor answered with an error or hung up."""

    code = ErrorCode.QMP


class GuestAgentError(HypervisorError):
    """The guest agent answered with an error, timed out or hung up."""

    code = ErrorCode.GUEST_AGENT


class GuestAgentSilent(GuestAgentError):
    """Nothing answered guest-sync in the time given (the guest may still be booting)."""


class ImageError(VmmeshError):
    """A base image is missing, malformed or does not match its manifest."""

    code = ErrorCode.IMAGE


class IntegrityError(VmmeshError):
    """Content does not match its hash."""

    code = ErrorCode.INTEGRITY


class PackageInstallError(VmmeshError):
    """A package does not exist in the package source, or its maintainer script
    failed (dpkg's error names it); the message names the package.

    The same source serves every host of a mesh, so no other host would do
    better: a request ends with this error instead of trying every host.
    """

    code = ErrorCode.PACKAGE_INSTALL


class PackageSourceError(VmmeshError):
    """The guest could not reach its package source (or apt failed for another
    reason than a missing package): another host may do better."""

    code = ErrorCode.PACKAGE_SOURCE


class CapacityError(VmmeshError):
    """The host has no room for what was asked."""

    code = ErrorCode.CAPACITY


class StateError(VmmeshError):
    """The local sqlite state is inconsistent or cannot be written."""

    code = ErrorCode.STATE


class TransferError(VmmeshError):
    """A blob could not be fetched from any holder."""

    code = ErrorCode.TRANSFER


class JobError(VmmeshError):
    """A job could not be run (not: the job's command failed, which is its exit status)."""

    code = ErrorCode.JOB


class JobInputError(JobError):
    """An input the job names does not exist or cannot be sent."""

    code = ErrorCode.JOB_INPUT


class NoJobVm(JobError):
    """No VM could be had for the job (no capacity, no base image, nothing placed)."""

    code = ErrorCode.JOB_NO_VM


class JobLost(JobError):
    """The job's VM, or the host running it, went away while the job used it."""

    code = ErrorCode.JOB_LOST


class JobOutputMissing(JobError):
    """The job asked for an output the command did not make."""

    code = ErrorCode.JOB_OUTPUT


def _classes() -> dict[str, type[VmmeshError]]:
    out: dict[str, type[VmmeshError]] = {}
    todo: list[type[VmmeshError]] = [VmmeshError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not VmmeshError and cls is not RemoteError and cls.__module__ == __name__:
            out.setdefault(cls.code.value, cls)
    return out


_BY_CODE = _classes()


def error_code(exc: VmmeshError) -> ErrorCode:
    """The code ``exc`` travels as (RemoteError, a code this version does not
    know, passes on as internal)."""
    return ErrorCode.INTERNAL if isinstance(exc, RemoteError) else exc.code


def from_code(code: str, message: str) -> VmmeshError:
    """The exception a peer's ``Fail(code, message)`` stands for."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(code, message)
    return cls(message)
