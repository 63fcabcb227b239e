"""What the server may learn of a device's failure: never the text of an arbitrary exception.

Flower turns an exception raised by a ClientApp handler into an error reply whose
reason is `str(type(ex)) + str(ex)`, sent to the server. An exception's text can hold
anything the failing code had at hand -- an item of the history, a user id, a path on
the device -- so the handlers are wrapped with `reported_errors`: a ReportableError
(an error in what the server sent, or a simulated fault; its text holds only that) goes
back as it is, anything else is logged on the device and replaced by a DeviceError that
names only the handler and the exception's type (docs/privacy.md, "What leaves the device").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Message

from fedinterest.common.errors import FedinterestError

LOG = logging.getLogger("flwr.fedinterest")

Handler = Callable[[Message, Context], Message]


class ReportableError(FedinterestError):
    """An error whose text may go to the server: it holds only what the server sent, or fixed text."""


class MessageError(ReportableError, ValueError):
    """What the server sent is not what this device can act on (its run config, records or config values)."""


class DeviceError(FedinterestError, RuntimeError):
    """The stand-in for any other failure: the handler and the exception's type, nothing of its text."""


def reported_errors(handler: Handler) -> Handler:
    """`handler`, raising only ReportableError or DeviceError (the original is logged on the device)."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except ReportableError:
            raise
        except Exception as exc:  # noqa: BLE001 -- every other failure is reported without its text
            LOG.error("fedinterest device: the %s handler failed", handler.__name__, exc_info=exc)
            # `from None`: the traceback Flower logs (in simulation, in the server's process) must not carry it either.
            raise DeviceError(
                f"the device's {handler.__name__} handler failed ({type(exc).__name__}); the details stay in the device's log"
            ) from None

    return wrapped
