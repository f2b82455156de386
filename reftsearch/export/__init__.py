"""A trained trial written for other libraries to load: pyreft's ``ReftModel.load``."""
