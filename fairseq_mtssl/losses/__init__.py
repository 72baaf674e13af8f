"""Loss functions shared by the plugin's criterions."""
