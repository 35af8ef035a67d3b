"""The appliance daemon: API, job runner, scheduler, NBD server, console."""
