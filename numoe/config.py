"""placeholder: being written"""
class MoEConfig: pass
