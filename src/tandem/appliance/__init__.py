"""The appliance daemon: API, job runner, scheduler, NBD server, console."""

from tandem.transport.api import build_models

# The wire models defer building (a CLI command needs only one or two); the daemon serves
# them all, and its routes must see them built.
build_models()
