"""One exception root, precise subclasses.

Two families, as in h11: errors that mean *you* (the local user or caller)
asked for something wrong, and errors that mean a *peer* or the machine
misbehaved.  Every subclass has one exact meaning; the CLI prints
``str(exc)`` as a one-line message and never a traceback for these.
"""

from __future__ import annotations


class VmmeshError(Exception):
    """Root of every error vmmesh raises on purpose."""


# --- the caller or user asked for something wrong -------------------------


class UsageError(VmmeshError):
    """Bad arguments or input from the local user."""


class ConfigError(VmmeshError):
    """The configuration (file, environment, flags) is invalid."""


class NotInitialized(VmmeshError):
    """This host has no mesh identity yet (run `vmmesh init` or `vmmesh join`)."""


class NotFound(VmmeshError):
    """A named thing (VM, template, host, image) does not exist."""


class NodeNotRunning(VmmeshError):
    """The local node's control socket does not answer."""


# --- peers and the wire ---------------------------------------------------


class ProtocolError(VmmeshError):
    """A peer sent something that breaks the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is over the limit."""


class MalformedMessage(ProtocolError):
    """Bytes that are not msgpack, or msgpack of the wrong shape."""


class UnknownMessage(ProtocolError):
    """A well-formed message of a kind or method we do not know."""


class RemoteError(VmmeshError):
    """The peer answered a call with an error; ``code`` names its class."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerUnavailable(VmmeshError):
    """The transport to a peer failed or the peer does not answer."""


class AuthError(VmmeshError):
    """Certificates, keys or the TLS handshake did not check out."""


class TokenError(AuthError):
    """A join token is malformed, used, expired or unknown."""


class Revoked(AuthError):
    """The host has been removed from the mesh."""


# --- the machine ----------------------------------------------------------


class HypervisorError(VmmeshError):
    """QEMU or qemu-img failed."""


class QMPError(HypervisorError):
    """The QEMU monitor answered with an error or hung up."""


class GuestAgentError(HypervisorError):
    """The guest agent answered with an error, timed out or hung up."""


class ImageError(VmmeshError):
    """A base image is missing, malformed or does not match its manifest."""


class IntegrityError(VmmeshError):
    """Content does not match its hash."""


class PackageInstallError(VmmeshError):
    """Installing packages in a guest failed; the message names the package."""


class CapacityError(VmmeshError):
    """The host has no room for what was asked."""


class StateError(VmmeshError):
    """The local sqlite state is inconsistent or cannot be written."""
