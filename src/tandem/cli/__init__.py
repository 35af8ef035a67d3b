"""The operator's command line (Typer + Rich). It talks to the API only."""
