"""MJCF for the embedded tabletop: table, camera, mocap gripper and slots for objects/fixtures.

One model is compiled per env and reused for every episode (the renderer is bound to it), so
the scene has a fixed number of *slots*. Each reset re-colours, re-shapes and re-positions the
slots from the seed. An object slot carries one geom per shape; the inactive ones are moved to
a hidden geom group with collisions off.
"""

from __future__ import annotations

# --- Geometry (metres). The table top is the plane z = 0. -----------------------------------
TABLE_HALF = 0.35  # half extent of the square table top
SPAWN_HALF = 0.23  # object and fixture centres are sampled in [-SPAWN_HALF, SPAWN_HALF]^2
OBJECT_HALF = 0.025  # every shape is 5 cm tall / wide so stacking heights do not depend on shape
PAD_HALF = 0.06  # push targets: flat squares, visual only
PLATE_RADIUS = 0.055  # pick-and-place targets: thin discs
PLATE_HALF_HEIGHT = 0.004
BUTTON_HOUSING_RADIUS = 0.035
BUTTON_HOUSING_HALF_HEIGHT = 0.01
BUTTON_CAP_RADIUS = 0.027
BUTTON_CAP_HALF_HEIGHT = 0.008
BUTTON_TRAVEL = 0.012
BUTTON_CAP_TOP = 2 * BUTTON_HOUSING_HALF_HEIGHT + 2 * BUTTON_CAP_HALF_HEIGHT  # unpressed, z

# Gripper: the "grip" site (the end effector) sits between the finger tips.
FINGER_HALF = (0.006, 0.012, 0.03)
FINGER_CENTER_Z = 0.015  # finger tips are FINGER_CENTER_Z - FINGER_HALF[2] below the grip site
FINGER_CLOSED_X = 0.008  # finger centre |x| when fully closed
FINGER_TRAVEL = 0.04  # per finger: open gap = 2 * (FINGER_TRAVEL + 0.002)

SHAPES = ("cube", "cylinder", "sphere")
HIDDEN_GROUP = 5  # geom group that the renderer never draws
FLOOR_Z = -0.7  # a hidden floor under the table: catches anything that falls off

_GEOM_OF_SHAPE = {
    "cube": f'type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}"',
    "cylinder": f'type="cylinder" size="{OBJECT_HALF} {OBJECT_HALF}"',
    "sphere": f'type="sphere" size="{OBJECT_HALF}"',
}


def object_geom_name(slot: int, shape: str) -> str:
    return f"obj{slot}_{shape}"


def _object_slot(i: int) -> str:
    # Explicit inertia: the hidden shape geoms must not change the mass of the slot.
    geoms = "\n".join(
        f'      <geom name="{object_geom_name(i, s)}" {_GEOM_OF_SHAPE[s]} material="matte"/>'
        for s in SHAPES
    )
    return f"""
    <body name="obj{i}" pos="{0.1 * i} 0.5 {OBJECT_HALF}">
      <freejoint name="obj{i}"/>
      <inertial pos="0 0 0" mass="0.05" diaginertia="2e-5 2e-5 2e-5"/>
{geoms}
    </body>"""


def _button_slot(i: int) -> str:
    hh, ch = BUTTON_HOUSING_HALF_HEIGHT, BUTTON_CAP_HALF_HEIGHT
    return f"""
    <body name="fix{i}" pos="{0.1 * i} -0.5 0">
      <geom name="fix{i}_housing" type="cylinder" size="{BUTTON_HOUSING_RADIUS} {hh}"
            pos="0 0 {hh}" rgba=".2 .2 .22 1" material="matte"/>
      <body name="fix{i}_cap" pos="0 0 {2 * hh + ch}" gravcomp="1">
        <joint name="fix{i}_press" type="slide" axis="0 0 1" range="{-BUTTON_TRAVEL} 0"
               stiffness="40" damping="2"/>
        <geom name="fix{i}_cap" type="cylinder" size="{BUTTON_CAP_RADIUS} {ch}" mass="0.02"
              material="matte"/>
      </body>
    </body>"""


def _pad_slot(i: int) -> str:
    return f"""
    <body name="fix{i}" pos="{0.1 * i} -0.5 0">
      <geom name="fix{i}_pad" type="box" size="{PAD_HALF} {PAD_HALF} 0.0008" pos="0 0 0.0008"
            contype="0" conaffinity="0" material="matte"/>
    </body>"""


def _plate_slot(i: int) -> str:
    return f"""
    <body name="fix{i}" pos="{0.1 * i} -0.5 0">
      <geom name="fix{i}_plate" type="cylinder" size="{PLATE_RADIUS} {PLATE_HALF_HEIGHT}"
            pos="0 0 {PLATE_HALF_HEIGHT}" material="matte"/>
    </body>"""


_FIXTURE_SLOT = {"button": _button_slot, "pad": _pad_slot, "plate": _plate_slot}


def build_scene_xml(
    n_objects: int, fixture_kind: str | None, n_fixtures: int, image_size: int
) -> str:
    """Return the MJCF string of a tabletop with the given number of object/fixture slots."""
    if fixture_kind is None and n_fixtures:
        raise ValueError("n_fixtures > 0 needs a fixture_kind")
    fixtures = "".join(_FIXTURE_SLOT[fixture_kind](i) for i in range(n_fixtures or 0))
    objects = "".join(_object_slot(i) for i in range(n_objects))
    grasp_welds = "\n".join(
        f'    <weld name="grasp{i}" body1="gripper" body2="obj{i}" active="false" solref="0.01 1"/>'
        for i in range(n_objects)
    )
    fx, fy, fz = FINGER_HALF
    return f"""
<mujoco model="embedded_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast"/>
  <visual>
    <global offwidth="{max(image_size, 64)}" offheight="{max(image_size, 64)}"/>
    <quality shadowsize="0" numslices="16" numstacks="8" numquads="1"/>
    <headlight ambient=".35 .35 .35" diffuse=".45 .45 .45" specular="0 0 0"/>
  </visual>
  <asset>
    <material name="matte" specular="0" shininess="0" reflectance="0"/>
  </asset>
  <worldbody>
    <light name="top" directional="true" pos="0 0 2" dir="0.2 0.3 -1" castshadow="false"
           diffuse=".5 .5 .5" specular="0 0 0"/>
    <!-- Catches anything knocked off the table; never drawn. -->
    <geom name="floor" type="plane" size="3 3 .1" pos="0 0 {FLOOR_Z}" group="{HIDDEN_GROUP}"/>
    <geom name="table" type="box" size="{TABLE_HALF} {TABLE_HALF} 0.02" pos="0 0 -0.02"
          rgba=".55 .53 .5 1" material="matte"/>
    <camera name="agentview" pos="0 -0.4 0.78" xyaxes="1 0 0 0 0.899 0.438" fovy="45"/>

    <body name="mocap" mocap="true" pos="0 0 0.25"/>
    <body name="gripper" pos="0 0 0.25" gravcomp="1">
      <freejoint name="gripper"/>
      <inertial pos="0 0 0.06" mass="0.3" diaginertia="1e-3 1e-3 1e-3"/>
      <site name="grip" size="0.004" rgba="1 1 1 0" group="{HIDDEN_GROUP}"/>
      <geom name="palm" type="box" size="0.058 0.016 0.012" pos="0 0 0.057"
            rgba=".75 .75 .78 1" material="matte"/>
      <geom name="wrist" type="cylinder" size="0.018 0.05" pos="0 0 0.119"
            rgba=".3 .3 .33 1" material="matte"/>
      <camera name="wrist" pos="0 -0.07 0.09" xyaxes="1 0 0 0 0.94 0.35" fovy="75"/>
      <body name="finger_left" pos="-{FINGER_CLOSED_X} 0 {FINGER_CENTER_Z}" gravcomp="1">
        <joint name="finger_left" type="slide" axis="-1 0 0" range="0 {FINGER_TRAVEL}"
               damping="5"/>
        <geom name="finger_left" type="box" size="{fx} {fy} {fz}" mass="0.02"
              rgba=".3 .3 .33 1" material="matte"/>
      </body>
      <body name="finger_right" pos="{FINGER_CLOSED_X} 0 {FINGER_CENTER_Z}" gravcomp="1">
        <joint name="finger_right" type="slide" axis="1 0 0" range="0 {FINGER_TRAVEL}"
               damping="5"/>
        <geom name="finger_right" type="box" size="{fx} {fy} {fz}" mass="0.02"
              rgba=".3 .3 .33 1" material="matte"/>
      </body>
    </body>
{fixtures}
{objects}
  </worldbody>
  <equality>
    <weld name="mocap" body1="mocap" body2="gripper" relpose="0 0 0 1 0 0 0" solref="0.01 1"/>
{grasp_welds}
  </equality>
  <actuator>
    <position name="finger_left" joint="finger_left" kp="300" ctrlrange="0 {FINGER_TRAVEL}"
              forcerange="-6 6"/>
    <position name="finger_right" joint="finger_right" kp="300" ctrlrange="0 {FINGER_TRAVEL}"
              forcerange="-6 6"/>
  </actuator>
</mujoco>
"""
