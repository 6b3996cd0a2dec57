"""One module per supported ``model_type``, each exporting ``ARCHITECTURE`` (an
``openpto.architectures.Architecture``). ``openpto.architectures.architecture(model_type)`` finds
them by name; adding an architecture is adding a module here."""
