"""Text for people: sizes and units, the terminal's progress bar."""
