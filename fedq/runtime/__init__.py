"""Where runs execute: thin Ray actors (or in-process objects) around the plain fed classes."""
