# Package one hetmem RTL kernel as a Vitis kernel object (.xo).
#   vivado -mode batch -source package_kernel.tcl -tclargs <kernel> <rtl_dir> <kernel_xml> <xo> <part>
# The kernel's top module is named after the kernel (fpga/vitis/top/<kernel>.v wraps the
# engine); its AXI4-Lite slave is s_axi_control and each buffer argument has its own
# 512-bit AXI4 master m_axi_<arg> (see kernels/<kernel>.xml, generated from hetmem.kernels).
if { $::argc != 5 } {
  puts "usage: package_kernel.tcl <kernel> <rtl_dir> <kernel_xml> <xo> <part>"
  exit 1
}
set kernel     [lindex $::argv 0]
set rtl_dir    [lindex $::argv 1]
set kernel_xml [lindex $::argv 2]
set xo         [lindex $::argv 3]
set part       [lindex $::argv 4]
set work       "build/${kernel}"
set ip_dir     "${work}/ip"

create_project -force ${kernel}_pack ${work}/project -part $part
add_files -norecurse [concat [glob ${rtl_dir}/*.v] [glob ${rtl_dir}/*.vh] [glob top/${kernel}.v]]
set_property include_dirs [list [file normalize $rtl_dir]] [current_fileset]
set_property top $kernel [current_fileset]
update_compile_order -fileset sources_1

ipx::package_project -root_dir $ip_dir -vendor hetmem.org -library kernel -taxonomy /KernelIP \
  -import_files -set_current false
ipx::unload_core ${ip_dir}/component.xml
ipx::edit_ip_in_project -upgrade true -name ${kernel}_edit -directory $ip_dir ${ip_dir}/component.xml
set core [ipx::current_core]
set_property core_revision 1 $core
foreach up [ipx::get_user_parameters] {
  ipx::remove_user_parameter [get_property NAME $up] $core
}
# Every AXI interface runs on ap_clk; ap_rst_n is the active-low reset Vitis drives.
foreach busif [ipx::get_bus_interfaces -of_objects $core] {
  set name [get_property NAME $busif]
  if { [string match "m_axi_*" $name] || $name eq "s_axi_control" } {
    ipx::associate_bus_interfaces -busif $name -clock ap_clk $core
  }
}
set_property sdx_kernel true $core
set_property sdx_kernel_type rtl $core
set_property supported_families { } $core
set_property auto_family_support_level level_2 $core
ipx::create_xgui_files $core
ipx::update_checksums $core
ipx::check_integrity -kernel $core
ipx::save_core $core
close_project -delete

if {[file exists $xo]} { file delete -force $xo }
package_xo -xo_path $xo -kernel_name $kernel -ip_directory $ip_dir -kernel_xml $kernel_xml
