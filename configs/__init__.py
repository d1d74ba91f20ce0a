"""The training configurations that ship with funcgrad: ``funcgrad train --config spiral`` reads spiral.toml here."""
