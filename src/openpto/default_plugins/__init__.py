"""The built-in plugins: ``openpto``'s own methods, kernels, backends and formats, registered
through the same hooks (``openpto.hookspecs``) as any installed plugin. Each names its entries
as ``"module:attr"`` strings, so registering them imports nothing."""
