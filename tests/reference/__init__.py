"""Independent transcriptions of upstream reference code, used only by the parity tests."""
