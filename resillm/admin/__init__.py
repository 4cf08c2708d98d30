"""The admin surface under ``/admin/``, guarded by ``auth.admin_key``."""
